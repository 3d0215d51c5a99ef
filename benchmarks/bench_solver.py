#!/usr/bin/env python
"""Solver step time vs the FFTs it is made of (a pseudo-spectral step is bounded by its FFTs).

    python benchmarks/bench_solver.py [--grids 32 64] [--repeats 20] [--threads 2]

Per grid: median wall time of one channel step (mirror + penalization) and one porous step,
and of one forward + inverse real FFT of a scalar N^3 field, measured in the same run. A step
does 3 RK stages x 9 scalar FFTs (u, curl u, u x curl u) + 6 for penalization and projection
= 33 scalar FFTs = 16.5 forward/inverse pairs, so `step / pair` near 16.5 means the step costs
its FFTs and little else.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import torch

from shodh.fields.spectral import SpectralGrid
from shodh.physics import domains
from shodh.physics.solver import NavierStokes

FFT_PAIRS_PER_STEP = 16.5


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up (plans, allocations)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(n: int, repeats: int) -> dict:
    grid = SpectralGrid(n, dtype=torch.float32)
    field = torch.randn(n, n, n)
    pair = median_time(lambda: grid.ifft(grid.fft(field)), repeats * 3)
    channel, geo = domains.channel_solver(domains.ChannelConfig(), grid, eta=1e-3)
    channel.set_velocity(domains.channel_initial(domains.ChannelConfig(), grid, geo, seed=0))
    step_channel = median_time(lambda: channel.step(1e-3), repeats)
    packing = domains.sphere_packing(domains.PorousConfig(), grid, np.random.default_rng(0))
    porous = NavierStokes(grid, 0.1, domains.porous_forcing(domains.PorousConfig(), 0.0), chi_XYZ=packing["chi"])
    step_porous = median_time(lambda: porous.step(1e-3), repeats)
    return {
        "grid": n, "fft_pair_ms": pair * 1e3, "channel_step_ms": step_channel * 1e3,
        "porous_step_ms": step_porous * 1e3, "channel_step_per_fft_pair": step_channel / pair,
        "porous_step_per_fft_pair": step_porous / pair, "fft_pairs_per_step": FFT_PAIRS_PER_STEP,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [bench(n, args.repeats) for n in args.grids]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, medians of {args.repeats}")
    print("| grid | FFT pair (ms) | channel step (ms) | porous step (ms) | channel step / pair | porous step / pair "
          "| FFT pairs per step |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['grid']}^3 | {r['fft_pair_ms']:.2f} | {r['channel_step_ms']:.1f} | {r['porous_step_ms']:.1f} | "
              f"{r['channel_step_per_fft_pair']:.1f} | {r['porous_step_per_fft_pair']:.1f} | {r['fft_pairs_per_step']} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
