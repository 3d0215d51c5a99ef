"""MoE vs dense step time at real token counts, expert-count scaling, MFU, and where the MoE's time goes.

One process, the model plus a torch AdamW step, no launcher: this isolates the MoE layer's cost
from communication. For each tokens-per-rank size S (default 512, 2048, 8192: the demo's micro
batch and the paper's 16 x 512), the configs compared are built once and timed interleaved
(A B A B ...), forward + backward and the optimizer step separately; the figures are medians over
the repeats, quoted as ratios from the same run (a shared machine only ever adds time, and it adds
it to all configs alike within one interleaved round).

- moe/dense_active: MoE (E=4) over the dense model of equal active parameters, capacity factor 1.0
- E16/E2: step time at E=16 over E=2 at fixed active parameters (expert width fixed)
- MFU: 3 x forward matmul FLOPs per token x tokens/s over a dense matmul peak measured here
  (fp32 on CPU, bf16 on GPU)
- E=16 ds-loop: E=16 with DeepSpeed's per-expert loop instead of shodh's grouped expert GEMM
- breakdown (E=16, torch.profiler): forward time in the gate, dispatch (DeepSpeed's slot scatter),
  experts, combine, the rest of the model; backward as a whole; the optimizer step

The optimizer is torch's AdamW with `--adamw fused` (default; one kernel over all parameters),
`foreach` (multi-tensor) or `loop` (per parameter, torch's CPU default).

Usage: python benchmarks/bench_moe.py [--tokens 512,2048,8192] [--repeats 5] [--dim 128] [--depth 4]
       [--patch 2] [--adamw fused|foreach|loop] [--threads T] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
import types

import torch
import torch.nn.functional as F
from deepspeed.moe.experts import Experts
from deepspeed.moe.sharded_moe import MOELayer, TopKGate
from torch.profiler import ProfilerActivity, profile, record_function

from shodh.model.config import ModelConfig
from shodh.model.moe import GroupedExperts
from shodh.model.params import count_params
from shodh.model.transformer import LatentTransformer, forward_flops_per_token
from shodh.train.trainer import measure_peak_flops

CHANNELS = 8
LOOP = " ds-loop"  # config-name suffix: the same config with DeepSpeed's per-expert loop


def make(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, adamw: str, expert_loop: bool = False):
    """Model and optimizer; `expert_loop`: run DeepSpeed's own per-expert loop (Experts.forward) instead of
    shodh's grouped GEMM, on the same parameters, for the A/B comparison."""
    torch.manual_seed(0)
    model = LatentTransformer(cfg, CHANNELS).to(device, dtype)
    if expert_loop:
        for module in model.modules():
            if isinstance(module, GroupedExperts):
                module.forward = types.MethodType(Experts.forward, module)
    flags = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}[adamw]
    return model, torch.optim.AdamW(model.parameters(), lr=1e-4, **flags)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_times(model, opt, z: torch.Tensor, device: torch.device) -> tuple[float, float]:
    """(forward + backward seconds, optimizer seconds) of one training step."""
    sync(device)
    t0 = time.perf_counter()
    pred, router_loss = model(z)
    (F.mse_loss(pred.float(), z.float()) + router_loss.weighted(model.cfg)).backward()
    sync(device)
    t1 = time.perf_counter()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return t1 - t0, time.perf_counter() - t1


def interleaved(configs: dict[str, ModelConfig], repeats: int, batch: int, device, dtype, adamw: str) -> dict:
    """Median forward+backward and optimizer seconds per config, runs interleaved; one warm-up step each."""
    built = {name: make(cfg, device, dtype, adamw, expert_loop=name.endswith(LOOP)) for name, cfg in configs.items()}
    z = torch.randn(batch, CHANNELS, 16, 16, 16, device=device, dtype=dtype)
    for model, opt in built.values():
        step_times(model, opt, z, device)
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in configs}
    for _ in range(repeats):
        for name, (model, opt) in built.items():
            times[name].append(step_times(model, opt, z, device))
    out = {}
    for name, t in times.items():
        fb, op = statistics.median(x[0] for x in t), statistics.median(x[1] for x in t)
        out[name] = {"fwd_bwd_s": fb, "opt_s": op, "step_s": statistics.median(x[0] + x[1] for x in t)}
    return out


def breakdown(cfg: ModelConfig, batch: int, device, dtype, adamw: str) -> dict[str, float]:
    """Milliseconds per step by part, from torch.profiler: the MoE layer's forward pieces are marked by
    record_function ranges around DeepSpeed's gate and experts (dispatch and combine are the rest of its
    MOELayer.forward); backward and the optimizer step are timed as a whole."""
    model, opt = make(cfg, device, dtype, adamw)
    z = torch.randn(batch, CHANNELS, 16, 16, 16, device=device, dtype=dtype)
    ranges: dict[int, record_function] = {}

    def enter(name: str):
        def hook(module, args):
            ranges[id(module)] = record_function(name)
            ranges[id(module)].__enter__()
        return hook

    def leave(module, args, output):
        ranges.pop(id(module)).__exit__(None, None, None)

    handles = []
    for module in model.modules():
        name = next((n for cls, n in ((TopKGate, "moe/gate"), (Experts, "moe/experts"), (MOELayer, "moe/layer"))
                     if isinstance(module, cls)), None)
        if name:
            handles += [module.register_forward_pre_hook(enter(name)), module.register_forward_hook(leave)]
    step_times(model, opt, z, device)  # warm-up
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        with record_function("forward"):
            pred, router_loss = model(z)
            loss = F.mse_loss(pred.float(), z.float()) + router_loss.weighted(model.cfg)
        with record_function("backward"):
            loss.backward()
        with record_function("optimizer"):
            opt.step()
            opt.zero_grad(set_to_none=True)
        sync(device)
    for h in handles:
        h.remove()
    attr = "device_time_total" if device.type == "cuda" else "cpu_time_total"
    ms = {e.key: getattr(e, attr) / 1e3 for e in prof.key_averages() if e.key.startswith(("moe/", "forward", "backward",
                                                                                            "optimizer"))}
    gate, experts, layer = ms.get("moe/gate", 0.0), ms.get("moe/experts", 0.0), ms.get("moe/layer", 0.0)
    return {"gate": gate, "dispatch_combine": layer - gate - experts, "experts": experts,
            "rest_of_forward": ms["forward"] - layer, "backward": ms["backward"], "optimizer": ms["optimizer"]}


def report(r: dict, repeats: int) -> None:
    print(f"\nS = {r['tokens_per_rank']} tokens per rank (batch {r['batch']}), medians of {repeats}")
    print(f"{'config':<14}{'fwd+bwd ms':>11}{'opt ms':>8}{'step ms':>9}{'tok/s':>9}{'MFU':>6}{'params total':>14}")
    for row in r["rows"]:
        print(f"{row['config']:<14}{row['fwd_bwd_s']:>11.1f}{row['opt_s']:>8.1f}{row['step_s']:>9.1f}"
              f"{row['tokens_per_s']:>9.0f}{row['mfu']:>6.2f}{row['params_total']:>14,}")
    print(f"MoE/dense_active {r['moe_over_dense_active']:.3f} (fwd+bwd {r['moe_over_dense_active_fwd_bwd']:.3f}; "
          f"goal <= 1.05), E16/E2 {r['e16_over_e2']:.3f} (fwd+bwd {r['e16_over_e2_fwd_bwd']:.3f}; goal <= 1.10)")
    print(f"E=16 with DeepSpeed's expert loop / grouped GEMM: {r['e16_ds_loop_over_grouped']:.3f}")
    print("E=16 breakdown ms: " + ", ".join(f"{k} {v:.1f}" for k, v in r["breakdown_ms_e16"].items()), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="512,2048,8192", help="tokens per rank per step, comma-separated")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--patch", type=int, default=2, help="2: the paper's 512 tokens per sample")
    ap.add_argument("--adamw", choices=("fused", "foreach", "loop"), default="fused")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (0: torch's default); 1 keeps ratios stable on a shared machine")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    base = ModelConfig(patch=args.patch, dim=args.dim, depth=args.depth, heads=4, expert_dim=4 * args.dim,
                       num_experts=4, moe_every=1, capacity_factor=1.0, min_capacity=0, shared_expert=True)
    dense = dataclasses.replace(base, kind="dense_active")
    peak = measure_peak_flops(device, dtype)
    results = []
    for tokens in (int(t) for t in args.tokens.split(",")):
        batch = max(1, tokens // base.tokens)
        S = batch * base.tokens
        configs = {"moe E=4": base, "dense_active": dense,
                   **{f"E={e}": dataclasses.replace(base, num_experts=e) for e in (2, 16)},
                   f"E=16{LOOP}": dataclasses.replace(base, num_experts=16)}
        t = interleaved(configs, args.repeats, batch, device, dtype, args.adamw)
        rows = []
        for name, cfg in configs.items():
            flops = 3 * forward_flops_per_token(cfg, CHANNELS) * S
            params = count_params(LatentTransformer(cfg, CHANNELS))
            rows.append({"config": name, **{k: 1e3 * v for k, v in t[name].items()},
                         "tokens_per_s": S / t[name]["step_s"], "mfu": flops / t[name]["step_s"] / peak,
                         "mfu_fwd_bwd": flops / t[name]["fwd_bwd_s"] / peak,
                         "params_total": params["total"], "params_active": params["active"]})
        results.append({
            "tokens_per_rank": S, "batch": batch,
            "moe_over_dense_active": t["moe E=4"]["step_s"] / t["dense_active"]["step_s"],
            "moe_over_dense_active_fwd_bwd": t["moe E=4"]["fwd_bwd_s"] / t["dense_active"]["fwd_bwd_s"],
            "e16_over_e2": t["E=16"]["step_s"] / t["E=2"]["step_s"],
            "e16_over_e2_fwd_bwd": t["E=16"]["fwd_bwd_s"] / t["E=2"]["fwd_bwd_s"],
            "e16_ds_loop_over_grouped": t[f"E=16{LOOP}"]["step_s"] / t["E=16"]["step_s"],
            "breakdown_ms_e16": breakdown(configs["E=16"], batch, device, dtype, args.adamw), "rows": rows})
        report(results[-1], args.repeats)  # as each size finishes: S = 8192 takes minutes on a CPU
    summary = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu x{torch.get_num_threads()} threads",
        "dtype": str(dtype).removeprefix("torch."), "adamw": args.adamw, "dim": args.dim, "depth": args.depth,
        "peak_flops_measured": peak, "repeats": args.repeats, "sizes": results,
    }
    print(f"peak {peak:.3g} FLOP/s measured ({summary['dtype']} matmul); AdamW {args.adamw}")
    print(json.dumps(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
