"""Driver for test_reshard (run by it, single or under the deepspeed launcher).

Trains the real engine (shodh.train.engine: ZeRO-2, MoE optimizer groups, expert parallelism) on
fixed global batches: step s draws 4 samples from a generator seeded by s, cut into micro batches
of 2; micro batch j = rank * grad_accum + accumulation index. So any layout with the same micro
batch and global batch sees the same micro batches (capacity factor E: no token is dropped, so
routing does not depend on how they are grouped). Optionally resumes from RUN/checkpoints (through
shodh.train.checkpoint, i.e. DeepSpeed's own load_checkpoint) and saves at step SAVE_AT.
Writes OUT/losses-rank<r>.json ({step: world-mean loss}) and OUT/{loaded,saved}-rank<r>.pt: every
parameter's full fp32 master weight and Adam moments (expert names carry the global expert index),
Adam step counts and learning rates, right after the resume and at SAVE_AT.
Usage: reshard_probe.py EP_SIZE GRAD_ACCUM RUN_DIR OUT_DIR MAX_STEPS SAVE_AT
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.utils import lazy_init_hp_params_optimizer_state, safe_get_full_fp32_param, safe_get_full_optimizer_state

from shodh.distributed import dist_info, init_process_group, strip_local_rank
from shodh.model.config import ModelConfig
from shodh.train import checkpoint
from shodh.train.config import TrainConfig
from shodh.train.engine import build_engine, check_layout, load_ds_config

C, GLOBAL, MICRO = 4, 4, 2

argv, local_rank = strip_local_rank(sys.argv[1:])
ep_size, accum, run, out = int(argv[0]), int(argv[1]), Path(argv[2]), Path(argv[3])
max_steps, save_at = int(argv[4]), int(argv[5])
info = dist_info(local_rank_arg=local_rank)
mcfg = ModelConfig(patch=4, dim=32, depth=2, heads=2, expert_dim=48, num_experts=4, ep_size=ep_size, moe_every=1,
                   capacity_factor=4.0, min_capacity=0, aux_loss_coef=0.01)
tcfg = TrainConfig(micro_batch=MICRO, grad_accum=accum, lr=3e-3, warmup_steps=2, max_steps=max_steps)
layout = check_layout(mcfg, tcfg, info)
init_process_group(info, torch.device("cpu"), always=True)
engine, model = build_engine(mcfg, tcfg, layout, load_ds_config(tcfg, layout), C, seed=0)
ckpt_dir = run / "checkpoints"
local = mcfg.num_experts // ep_size


def dump_state(kind: str) -> None:
    # DeepSpeed links each parameter to its slice of the Adam moments once, after its first step;
    # a load replaces the moment tensors, so link again to read the current ones.
    zero = engine.optimizer
    for i, group in enumerate(zero.bit16_groups):
        lazy_init_hp_params_optimizer_state(group, zero.single_partition_of_fp32_groups[i], zero.optimizer.state)
    state = {}
    for name, p in model.named_parameters():
        # Collectives on ZeRO-2: every rank calls them for every parameter, in the same order.
        full = {"param": safe_get_full_fp32_param(p), "exp_avg": safe_get_full_optimizer_state(p, "exp_avg"),
                "exp_avg_sq": safe_get_full_optimizer_state(p, "exp_avg_sq")}
        match = re.search(r"deepspeed_experts\.(\d+)\.", name)
        if match:
            name = name[:match.start(1)] + str(layout.ep_rank * local + int(match.group(1))) + name[match.end(1):]
        state[name] = {k: v.detach().clone() for k, v in full.items()}
    base = engine.optimizer.optimizer
    state["__step__"] = sorted({int(s["step"]) for s in base.state.values()})
    state["__lr__"] = engine.get_lr()
    out.mkdir(parents=True, exist_ok=True)
    torch.save(state, out / f"{kind}-rank{info.rank}.pt")


step = 0
tag = checkpoint.latest_tag(ckpt_dir)
if tag is not None:
    step = checkpoint.restore(engine, ckpt_dir, tag, info.rank, "auto").step
    dump_state("loaded")
losses = {}
while step < max_steps:
    step += 1
    gen = torch.Generator().manual_seed(1000 + step)
    z_in = torch.randn(GLOBAL, C, 16, 16, 16, generator=gen)
    z_out = 0.9 * z_in + 0.1 * torch.randn(GLOBAL, C, 16, 16, 16, generator=gen)
    total = 0.0
    for a in range(accum):
        first = (info.rank * accum + a) * MICRO
        pred, router_loss = engine(z_in[first:first + MICRO])
        loss = F.mse_loss(pred, z_out[first:first + MICRO]) + router_loss.weighted(mcfg)
        engine.backward(loss)
        engine.step()
        total += loss.item() / accum
    mean = torch.tensor(total, dtype=torch.float64)
    dist.all_reduce(mean)
    losses[step] = mean.item() / info.world_size
    if step == save_at:
        dump_state("saved")
        checkpoint.save(engine, ckpt_dir, step, info.rank, {"world_size": info.world_size, "ep_size": ep_size},
                        {}, {"model": dataclasses.asdict(mcfg)})
out.mkdir(parents=True, exist_ok=True)
(out / f"losses-rank{info.rank}.json").write_text(json.dumps(losses))
