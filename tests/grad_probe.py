"""Driver for test_pretrain's gradient-equality test (run by it, single or under the deepspeed launcher).

ONE fixed global batch of 4 samples, split in two micro batches of 2. With 2 ranks: the real engine
(shodh.train.engine: ZeRO-2, MoE optimizer groups, expert parallelism), one micro batch per rank.
With 1 process: the reference, plain PyTorch autograd on the same model and seed, averaging the two
micro batches' losses (what data parallelism computes). Writes the mean loss and every parameter's
full gradient (expert names carry the global expert index) to OUT/rank-<r>.pt.
With VARIANTS (2 ranks only; comma-separated model.router variants from VARIANTS below), then one engine
per variant in turn, written to OUT/rank-<r>-<variant>.pt with the routers' biases after one bias update.
Usage: grad_probe.py EP_SIZE OUT_DIR [VARIANTS]
"""

from __future__ import annotations

import dataclasses
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import safe_get_full_grad

from shodh.distributed import dist_info, init_process_group, strip_local_rank
from shodh.model.config import ModelConfig, RouterConfig
from shodh.model.moe import routers, update_router_biases
from shodh.model.transformer import LatentTransformer
from shodh.train.config import TrainConfig
from shodh.train.engine import build_engine, check_layout, load_ds_config

C, GLOBAL, MICRO = 4, 4, 2

VARIANTS = {"switch": RouterConfig(), "global": RouterConfig(balance="global"), "bias": RouterConfig(balance="bias"),
            "none": RouterConfig(balance="none"), "zloss": RouterConfig(z_loss=1e-2), "sample": RouterConfig(scope="sample")}

argv, local_rank = strip_local_rank(sys.argv[1:])
ep_size, out = int(argv[0]), Path(argv[1])
variants = argv[2].split(",") if len(argv) > 2 else []
info = dist_info(local_rank_arg=local_rank)
# Capacity factor E: no token is ever dropped, so routing cannot depend on how tokens are grouped.
mcfg = ModelConfig(patch=4, dim=32, depth=2, heads=2, expert_dim=48, num_experts=4, ep_size=ep_size, moe_every=1,
                   capacity_factor=4.0, min_capacity=0, aux_loss_coef=0.01)
gen = torch.Generator().manual_seed(123)
z_in = torch.randn(GLOBAL, C, 16, 16, 16, generator=gen)
z_out = 0.9 * z_in + 0.1 * torch.randn(GLOBAL, C, 16, 16, 16, generator=gen)


def loss_of(model, first: int) -> torch.Tensor:
    pred, router_loss = model(z_in[first:first + MICRO])
    return F.mse_loss(pred, z_out[first:first + MICRO]) + router_loss.weighted(mcfg)


if info.world_size == 1:
    torch.manual_seed(0)  # as build_engine does
    model = LatentTransformer(mcfg, C, seed=0)
    loss_sum = 0.0
    for first in range(0, GLOBAL, MICRO):
        loss = loss_of(model, first) / (GLOBAL // MICRO)
        loss.backward()
        loss_sum += loss.item()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()}
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"loss": loss_sum, "grads": grads}, out / "rank-0.pt")
    sys.exit(0)

tcfg = TrainConfig(micro_batch=MICRO, grad_accum=1)
layout = check_layout(mcfg, tcfg, info)
init_process_group(info, torch.device("cpu"), always=True)


def probe(cfg: ModelConfig) -> dict:
    """One engine, one micro batch per rank: mean loss, full gradients by global name, router biases."""
    global mcfg
    mcfg = cfg
    engine, model = build_engine(cfg, tcfg, layout, load_ds_config(tcfg, layout), C, seed=0)
    for i, gate in enumerate(routers(model)):
        if getattr(gate, "bias_E", None) is not None:  # a fixed, nonzero bias so the probe sees it steer the choice
            with torch.no_grad():
                gate.bias_E.copy_(torch.linspace(-0.02, 0.02, cfg.num_experts) * (i + 1))
    loss = loss_of(engine, info.rank * MICRO)
    engine.backward(loss)
    loss_sum = torch.tensor(loss.item(), dtype=torch.float64)
    dist.all_reduce(loss_sum)
    update_router_biases(model)
    local = cfg.num_experts // ep_size
    grads = {}
    for name, p in model.named_parameters():
        grad = safe_get_full_grad(p)  # a collective on ZeRO-2: every rank calls it for every parameter
        match = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if match:
            glob = layout.ep_rank * local + int(match.group(1))
            name = name[:match.start(1)] + str(glob) + name[match.end(1):]
        grads[name] = grad.detach().clone().float()
    biases = [g.bias_E.clone() for g in routers(model) if getattr(g, "bias_E", None) is not None]
    return {"loss": loss_sum.item() / info.world_size, "grads": grads, "biases": biases}


out.mkdir(parents=True, exist_ok=True)
torch.save(probe(mcfg), out / f"rank-{info.rank}.pt")
for variant in variants:
    torch.save(probe(dataclasses.replace(mcfg, router=VARIANTS[variant])), out / f"rank-{info.rank}-{variant}.pt")
