"""Tokenizer cost: encode throughput (fields/s) and decoder + float64 Biot–Savart/curl time per
field, at 64^3 and 128^3, with peak memory. Weights are freshly initialized (cost does not
depend on training); the architecture comes from a profile's `tokenizer` section.

    .venv/bin/python benchmarks/bench_tokenizer.py [--profile demo] [--grids 64 128] [--device cpu]

Prints a markdown table and one JSON line. On a shared CPU the numbers are noisy: report the
machine's load with them.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from shodh.config import load_config
from shodh.physics.solver import band_limit
from shodh.tokenizer.model import build_net


def _timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up (allocator, FFT plans)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def _peak_mib(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


@torch.no_grad()
def bench(profile: str, grid: int, batch: int, repeats: int, device: torch.device) -> dict:
    cfg = load_config(profile)
    torch.manual_seed(0)
    net = build_net({**cfg.tokenizer.architecture(), "band": band_limit(grid)}, grid).to(device).eval()
    u = torch.randn(batch, 3, grid, grid, grid, device=device)
    mask = torch.zeros(batch, grid, grid, grid, device=device)
    z = net.encode(u, mask)
    encode_s = _timed(lambda: net.encode(u, mask), repeats, device)
    decode_s = _timed(lambda: net.decode(z[:1], mask[:1]), repeats, device)
    w = net.decode(z[:1], mask[:1]).double()
    curl_s = _timed(lambda: net.velocity(w), repeats, device)
    return {"grid": grid, "profile": profile, "operator": cfg.tokenizer.operator, "device": str(device),
            "threads": torch.get_num_threads(), "params": sum(p.numel() for p in net.parameters()),
            "encode_fields_per_s": batch / encode_s, "decode_net_s": decode_s, "fp64_curl_s": curl_s,
            "decode_total_s": decode_s + curl_s, "peak_mib": _peak_mib(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--grids", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = [bench(args.profile, n, args.batch, args.repeats, device) for n in args.grids]
    print("| grid | encode fields/s | decoder net s/field | fp64 Biot–Savart + curl s/field | peak MiB |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['grid']}^3 | {r['encode_fields_per_s']:.2f} | {r['decode_net_s']:.3f} | {r['fp64_curl_s']:.3f} "
              f"| {r['peak_mib']:.0f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
