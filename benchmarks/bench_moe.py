"""MoE vs dense step time, expert-count scaling, MFU and peak memory of the latent transformer.

One process, the model plus a torch AdamW step (forward, backward, optimizer), no launcher:
this isolates the MoE layer's cost from communication. Runs of the configs being compared
are interleaved (A B A B ...) and reduced by the minimum: load from other processes on a
shared machine only ever adds time, so the fastest repeat is the best estimate of the cost. Prints one table and a JSON summary.

- ratio: MoE / dense_active step time at capacity factor 1.0 (equal active params and FLOPs)
- scaling: step time for E = 2, 4, 8, 16 at fixed active params (expert width fixed), vs E = 2
- MFU: 3 x forward matmul FLOPs per token x tokens/s over a dense matmul peak measured here
  (fp32 on CPU, bf16 on GPU); peak memory: CUDA max allocated, or the process's peak RSS on CPU

Usage: python benchmarks/bench_moe.py [--steps 10] [--batch 8] [--dim 128] [--depth 4] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time

import torch
import torch.nn.functional as F

from shodh.model.config import ModelConfig
from shodh.model.params import count_params
from shodh.model.transformer import LatentTransformer, forward_flops_per_token
from shodh.train.trainer import measure_peak_flops

CHANNELS = 8


def make(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    torch.manual_seed(0)
    model = LatentTransformer(cfg, CHANNELS).to(device, dtype)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4)


def step_time(model, opt, z: torch.Tensor, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    pred, router_loss = model(z)
    (F.mse_loss(pred.float(), z.float()) + router_loss.weighted(model.cfg)).backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def interleaved(configs: dict[str, ModelConfig], steps: int, batch: int, device, dtype) -> dict[str, float]:
    """Fastest step seconds per config, runs interleaved; two warm-up steps each."""
    built = {name: make(cfg, device, dtype) for name, cfg in configs.items()}
    z = torch.randn(batch, CHANNELS, 16, 16, 16, device=device, dtype=dtype)
    for model, opt in built.values():
        for _ in range(2):
            step_time(model, opt, z, device)
    times: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(steps):
        for name, (model, opt) in built.items():
            times[name].append(step_time(model, opt, z, device))
    return {name: min(t) for name, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = ModelConfig(dim=args.dim, depth=args.depth, heads=4, expert_dim=2 * args.dim, num_experts=4,
                       moe_every=1, capacity_factor=1.0, min_capacity=0)
    tokens = args.batch * base.tokens
    peak = measure_peak_flops(device, dtype)

    pair = interleaved({"moe": base, "dense_active": dataclasses.replace(base, kind="dense_active")},
                       args.steps, args.batch, device, dtype)
    scan_cfgs = {f"E={e}": dataclasses.replace(base, num_experts=e) for e in (2, 4, 8, 16)}
    scan = interleaved(scan_cfgs, args.steps, args.batch, device, dtype)

    rows = []
    for name, cfg, t in [("moe E=4", base, pair["moe"]),
                         ("dense_active", dataclasses.replace(base, kind="dense_active"), pair["dense_active"])] + \
                        [(name, scan_cfgs[name], scan[name]) for name in scan_cfgs]:
        flops = 3 * forward_flops_per_token(cfg, CHANNELS) * tokens
        params = count_params(LatentTransformer(cfg, CHANNELS))
        rows.append({"config": name, "step_ms": 1e3 * t, "tokens_per_s": tokens / t, "mfu": flops / t / peak,
                     "params_total": params["total"], "params_active": params["active"]})
    if device.type == "cuda":
        peak_mem = torch.cuda.max_memory_allocated() / 2**20
        mem_note = "CUDA max allocated"
    else:
        peak_mem = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mem_note = "process peak RSS (all configs)"
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "dtype": str(dtype).removeprefix("torch."), "tokens_per_step": tokens,
        "peak_flops_measured": peak, "moe_over_dense_active": pair["moe"] / pair["dense_active"],
        "e16_over_e2": scan["E=16"] / scan["E=2"], "peak_memory_mib": peak_mem, "peak_memory_kind": mem_note,
        "rows": rows,
    }
    print(f"{'config':<14}{'step ms':>10}{'tok/s':>10}{'MFU':>7}{'params total':>14}{'active':>10}")
    for r in rows:
        print(f"{r['config']:<14}{r['step_ms']:>10.1f}{r['tokens_per_s']:>10.0f}{r['mfu']:>7.2f}"
              f"{r['params_total']:>14,}{r['params_active']:>10,}")
    print(f"MoE/dense_active step time {summary['moe_over_dense_active']:.3f} (goal <= 1.05); "
          f"E=16/E=2 {summary['e16_over_e2']:.3f} (goal <= 1.25); peak {peak:.3g} FLOP/s measured "
          f"({summary['dtype']} matmul); peak memory {peak_mem:.0f} MiB ({mem_note})")
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
