#!/usr/bin/env python
"""Large offline generation: split trajectories over worker processes and SLURM array tasks.

    # 8 local worker processes, then the manifest
    python data_pipeline/simulate.py --profile paper --root /scratch/shodh --workers 8
    # one SLURM array task (index/count from SLURM_ARRAY_TASK_*), no manifest yet ...
    python data_pipeline/simulate.py --profile paper --root /scratch/shodh --no-merge
    # ... and once every task finished (a dependent job): merge the per-trajectory records
    python data_pipeline/simulate.py --profile paper --root /scratch/shodh --merge-only

Trajectories are dealt round-robin over (task, worker); each finished trajectory leaves a
record under raw/parts/, so any task can be rerun (it skips finished work) and the merge
refuses to write a manifest while trajectories are missing.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing as mp
import os
import sys
from pathlib import Path

import torch

from shodh.config import load_config
from shodh.distributed import array_task
from shodh.errors import ShodhError
from shodh.physics import simulate
from shodh.workspace import ensure_root


def _worker(profile: str, overrides: list[str], root: str, index: int, count: int, threads: int) -> None:
    cfg = load_config(profile, [*overrides, f"sim.threads={threads}"])
    simulate.run(cfg.sim, cfg.seed, Path(root), task_index=index, num_tasks=count, merge=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="demo")
    parser.add_argument("--root", type=Path, default=Path("./shodh-work"))
    parser.add_argument("--workers", type=int, default=1, help="processes for this task's share")
    parser.add_argument("--task-index", type=int, help="this task's index (default: SLURM array index or 0)")
    parser.add_argument("--num-tasks", type=int, help="number of tasks (default: SLURM array size or 1)")
    parser.add_argument("--no-merge", action="store_true", help="skip writing the manifest (array tasks)")
    parser.add_argument("--merge-only", action="store_true", help="only merge finished trajectories into the manifest")
    parser.add_argument("--overwrite", action="store_true", help="replace raw data from another config (single task only)")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.profile, args.overrides)
        root = ensure_root(args.root)
        slurm_index, slurm_count = array_task()
        index = slurm_index if args.task_index is None else args.task_index
        count = slurm_count if args.num_tasks is None else args.num_tasks
        if not 0 <= index < count:
            raise ShodhError(f"--task-index {index} is outside 0..{count - 1}")
        if args.workers < 1:
            raise ShodhError(f"--workers must be >= 1, got {args.workers}")
        if args.overwrite and count > 1:
            raise ShodhError("--overwrite with several tasks would race; run it once with --num-tasks 1")
        if not args.merge_only:
            # Results are bitwise reproducible at a fixed thread count (reduction order), so an
            # explicit sim.threads is honoured everywhere; otherwise the cores are shared out.
            threads = cfg.sim.threads or max(1, len(os.sched_getaffinity(0)) // args.workers)
            torch.set_num_threads(threads)
            # Check the workspace and spin up the shared channel state once, before forking.
            sha = simulate.check_workspace(cfg.sim, cfg.seed, root, args.overwrite)
            if "channel" in cfg.sim.domains:
                simulate.channel_spinup(cfg.sim, cfg.seed, root, sha)
            jobs = [(args.profile, args.overrides, str(root), index * args.workers + w, count * args.workers, threads)
                    for w in range(args.workers)]
            if args.workers == 1:
                _worker(*jobs[0])
            else:
                with mp.get_context("spawn").Pool(args.workers) as pool:
                    pool.starmap(_worker, jobs)
        if args.merge_only or (count == 1 and not args.no_merge):
            manifest = simulate.merge_manifest(cfg.sim, cfg.seed, root)
            print(f"manifest: {root / 'raw' / 'manifest.json'} ({len(manifest['shards'])} shards)")
        return 0
    except ShodhError as exc:
        print(f"data_pipeline/simulate.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
