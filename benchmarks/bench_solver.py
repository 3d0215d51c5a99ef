#!/usr/bin/env python
"""Solver step time against the FFTs it does (a pseudo-spectral step should cost its FFTs).

    python benchmarks/bench_solver.py [--grids 32 64] [--steps 20] [--threads 2]

Per grid and domain, in float32 at the demo's settings: the median wall time of one step, the
scalar N^3 FFTs the step did (counted by the solver: 4.5 forward/inverse pairs per Runge–Kutta
stage, 3 per conjugate-gradient iteration of the penalization solve), and the median time of
one forward + inverse real FFT of a scalar N^3 field, timed next to every step. `step / FFT work`
= median over steps of step time / (pairs x pair time): 1.0 means the step is nothing but its FFTs.
Each domain is spun up first (channel from its initial profile, porous from rest) so that the
penalization solve sees the velocity changes of a running simulation, not a start from zero.
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
from shodh.physics.simulate import SimConfig
from shodh.physics.solver import NavierStokes


def solvers(n: int) -> dict[str, tuple[NavierStokes, float]]:
    """(solver after a short spin-up, max_dt) per domain, at the default configs."""
    sim = SimConfig(grid=n)
    grid = SpectralGrid(n, dtype=torch.float32)
    channel, geo = domains.channel_solver(sim.channel, grid, sim.eta)
    channel.set_velocity(domains.channel_initial(sim.channel, grid, geo, seed=0))
    packing = domains.sphere_packing(sim.porous, grid, np.random.default_rng(0))
    porous = NavierStokes(grid, sim.porous.nu, domains.porous_forcing(sim.porous, 0.0), chi_XYZ=packing["chi"], eta=sim.eta)
    out = {"channel": (channel, sim.channel.max_dt), "porous": (porous, sim.porous.max_dt)}
    for solver, max_dt in out.values():
        solver.advance(20 * max_dt, cfl=sim.cfl, max_dt=max_dt)
    return out


def bench(n: int, steps: int) -> list[dict]:
    grid = SpectralGrid(n, dtype=torch.float32)
    field = torch.randn(n, n, n)

    def pair() -> float:
        t0 = time.perf_counter()
        grid.ifft(grid.fft(field))
        return time.perf_counter() - t0

    rows = []
    for domain, (solver, max_dt) in solvers(n).items():
        dt = solver.stable_dt(SimConfig().cfl, max_dt)
        solver.step(dt)  # warm-up: plans, buffers, the step's cached factors
        transforms, iters = solver.block.transforms, solver.cg_iterations
        step_s, pair_s = [], []
        # Interleaved: every step is timed next to three FFT pairs, so a noisy neighbour slows
        # both sides of the ratio alike.
        for _ in range(steps):
            pair_s.append(statistics.median(pair() for _ in range(3)))
            t0 = time.perf_counter()
            solver.step(dt)
            step_s.append(time.perf_counter() - t0)
        pairs = (solver.block.transforms - transforms) / steps / 2
        rows.append({
            "grid": n, "domain": domain, "dt": dt, "step_ms": statistics.median(step_s) * 1e3,
            "fft_pair_ms": statistics.median(pair_s) * 1e3, "fft_pairs_per_step": pairs,
            "cg_iterations_per_step": (solver.cg_iterations - iters) / steps,
            "step_over_fft_work": statistics.median(s / (pairs * p) for s, p in zip(step_s, pair_s)),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [row for n in args.grids for row in bench(n, args.steps)]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, float32, medians of {args.steps} steps")
    print("| grid | domain | step (ms) | FFT pairs per step | CG iterations per step | FFT pair (ms) | step / FFT work |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['grid']}^3 | {r['domain']} | {r['step_ms']:.1f} | {r['fft_pairs_per_step']:.1f} | "
              f"{r['cg_iterations_per_step']:.1f} | {r['fft_pair_ms']:.2f} | {r['step_over_fft_work']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
