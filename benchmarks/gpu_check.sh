#!/usr/bin/env bash
# One GPU, the paper's shapes, one JSON out. Run from the repository root on a CUDA machine with the
# CUDA build of torch installed (README):
#   benchmarks/gpu_check.sh [OUT.json]          (default: gpu_check.json; work files under $WORK)
# 1. bench: the paper model (dim 512, depth 12, E = 16; ep_size 1, since one GPU holds all experts) in a
#    real DeepSpeed engine (ds_configs/zero2_gpu_bf16.json: bf16, ZeRO-2) at the paper's 16 x 512 tokens
#    per rank: median step time, tokens/s, MFU over a measured bf16 matmul peak, and CUDA peak memory
#    against `shodh plan`'s prediction for the same layout (parameters, gradients, optimizer,
#    activations), with and without activation checkpointing;
# 2. bench_moe.py at 512, 2048 and 8192 tokens per rank (MoE/dense_active, E16/E2, breakdown);
# 3. a 50-step paper-profile pretrain through the `deepspeed` launcher on synthetic latents.
# Everything lands in one JSON (also printed). Needs about 10 minutes on an H100-class GPU.
set -euo pipefail

OUT=${1:-gpu_check.json}
PY=${SHODH_PYTHON:-.venv/bin/python}
WORK=${WORK:-$(mktemp -d)}
command -v nvidia-smi >/dev/null || { echo "gpu_check: no nvidia-smi: this script needs a CUDA GPU" >&2; exit 2; }
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_check: torch has no CUDA')"

echo "==> 1. ZeRO-2 bf16 engine at the paper's tokens per rank, planned vs measured memory" >&2
"$PY" - "$WORK/engine.json" <<'EOF'
import json, statistics, sys, time
import torch, torch.nn.functional as F
from shodh.config import load_config
from shodh.distributed import DistInfo, init_process_group
from shodh.train.engine import build_engine, check_layout, load_ds_config
from shodh.train.plan import Hardware, make_plan
from shodh.train.trainer import measure_peak_flops
from shodh.model.transformer import forward_flops_per_token

info = DistInfo(rank=0, world_size=1)
init_process_group(info, torch.device("cuda", 0), always=True)
peak = measure_peak_flops(torch.device("cuda"), torch.bfloat16)
results = []
for ckpt in ("false", "true"):
    cfg = load_config("paper", ["model.ep_size=1", "train.ds_config=zero2_gpu_bf16.json",
                                f"model.activation_checkpointing={ckpt}"])
    layout = check_layout(cfg.model, cfg.train, info)
    channels = cfg.tokenizer.channels
    torch.cuda.reset_peak_memory_stats()
    engine, model = build_engine(cfg.model, cfg.train, layout, load_ds_config(cfg.train, layout), channels, seed=0)
    z = torch.randn(cfg.train.micro_batch, channels, 16, 16, 16, device="cuda", dtype=torch.bfloat16)
    times = []
    for step in range(12):
        torch.cuda.synchronize()
        t = time.perf_counter()
        pred, router_loss = engine(z)
        engine.backward(F.mse_loss(pred.float(), z.float()) + router_loss.weighted(cfg.model))
        engine.step()
        torch.cuda.synchronize()
        if step >= 2:
            times.append(time.perf_counter() - t)
    tokens = cfg.train.micro_batch * cfg.model.tokens
    step_s = statistics.median(times)
    plan = make_plan(cfg, 1, 1, Hardware(gpu=True, memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30,
                                         peak_flops=peak))
    results.append({"activation_checkpointing": ckpt == "true", "tokens_per_rank": tokens, "step_s": step_s,
                    "tokens_per_s": tokens / step_s,
                    "mfu": 3 * forward_flops_per_token(cfg.model, channels) * tokens / step_s / peak,
                    "measured_peak_bytes": torch.cuda.max_memory_allocated(),
                    "planned_bytes": plan.memory, "planned_total_bytes": plan.total,
                    "planned_over_measured": plan.total / torch.cuda.max_memory_allocated()})
    del engine, model
    torch.cuda.empty_cache()
json.dump({"device": torch.cuda.get_device_name(), "peak_bf16_flops_measured": peak, "engine": results},
          open(sys.argv[1], "w"), indent=2)
EOF

echo "==> 2. bench_moe at 512, 2048, 8192 tokens per rank" >&2
"$PY" benchmarks/bench_moe.py --tokens 512,2048,8192 --dim 512 --depth 4 --out "$WORK/bench_moe.json" >&2

echo "==> 3. 50-step paper-shape pretrain (deepspeed launcher, 1 GPU, synthetic latents)" >&2
PYTHONPATH=tests "$PY" -c "import sys; from latent_fixture import make_latents; \
make_latents(sys.argv[1], channels=8, trajectories={'train': 8, 'val': 2})" "$WORK/ws"
start=$(date +%s)
"$(dirname "$PY")/deepspeed" --num_gpus 1 --module shodh.pretrain --profile paper --root "$WORK/ws" \
  --run-name gpu-check model.ep_size=1 train.max_steps=50 train.log_every=10 train.val_every=50 \
  train.val_batches=2 train.ckpt_every=50 tracking.mlflow=false >&2
wall=$(($(date +%s) - start))

"$PY" - "$WORK" "$OUT" "$wall" <<'EOF'
import json, sys
from pathlib import Path
work, out, wall = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
run = work / "ws" / "runs" / "shodh" / "gpu-check"
rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
train = [r for r in rows if "train/loss" in r]
summary = {**json.loads((work / "engine.json").read_text()),
           "bench_moe": json.loads((work / "bench_moe.json").read_text()),
           "pretrain_50": {"wall_s": wall, "steps": train[-1]["step"], "final_loss": train[-1]["train/loss"],
                           "tokens_per_s": train[-1]["perf/tokens_per_s"], "mfu": train[-1]["perf/mfu"],
                           "checkpoint": (run / "checkpoints" / "latest").read_text().strip()}}
Path(out).write_text(json.dumps(summary, indent=2))
print(json.dumps(summary))
EOF
