"""Driver for test_plan's exactness test (run under the deepspeed launcher): build the real engine
(shodh.train.engine: ZeRO-2, MoE optimizer groups, expert parallelism) for the config given as dotted
overrides of the smoke profile, take one optimizer step, and write what DeepSpeed allocated on this
rank to OUT/rank-<r>.json: the flat parameter buffers, the fp32 master partitions and every tensor of
the AdamW state.
Usage: plan_probe.py OUT_DIR [section.key=value ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from shodh.config import load_config
from shodh.distributed import dist_info, init_process_group, strip_local_rank
from shodh.train.engine import build_engine, check_layout, load_ds_config

argv, local_rank = strip_local_rank(sys.argv[1:])
out, overrides = Path(argv[0]), argv[1:]
cfg = load_config("smoke", overrides)
info = dist_info(local_rank_arg=local_rank)
layout = check_layout(cfg.model, cfg.train, info)
init_process_group(info, torch.device("cpu"), always=True)
channels = cfg.tokenizer.channels
engine, model = build_engine(cfg.model, cfg.train, layout, load_ds_config(cfg.train, layout), channels, seed=0)
z = torch.randn(cfg.train.micro_batch, channels, 16, 16, 16)
pred, router_loss = engine(z)
engine.backward(F.mse_loss(pred, z) + router_loss.weighted(cfg.model))
engine.step()

zero = engine.optimizer


def nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


state = [t for s in zero.optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
measured = {"parameters": nbytes(zero.bit16_groups_flat),
            "optimizer": nbytes(zero.single_partition_of_fp32_groups) + nbytes(state),
            "model_params": nbytes(model.parameters())}
out.mkdir(parents=True, exist_ok=True)
(out / f"rank-{info.rank}.json").write_text(json.dumps(measured))
