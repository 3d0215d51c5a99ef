"""A tiny but complete workspace for evaluation and UI tests: every stage real except the simulator.

Raw shards are synthetic 16^3 divergence-free fields (no solver run: seconds instead of
minutes), written in DESIGN.md's raw layout with a manifest; then the real tokenizer training
(2 steps), `encode`, `pretrain` (MoE and dense, 2 steps each) and `evaluate` run on them.
`channel` is a mean flow plus fluctuations advected one cell along x per frame; `porous` is a
decaying field around a solid sphere. Both are built from the spectral grid's random
solenoidal fields, so they are divergence-free like the simulator's.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from shodh.cli import main
from shodh.fields.spectral import SpectralGrid
from shodh.io import AtomicShardWriter, write_json_atomic

GRID, FRAMES = 16, 4
SPLITS = {"train": 1, "val": 1, "test": 1}
# Overrides that make every stage take seconds on a loaded 2-core machine.
FAST = [
    "sim.grid=16", "tokenizer.channels=4", "tokenizer.width=8", "tokenizer.hidden=8", "tokenizer.blocks=1",
    "tokenizer.steps=2", "tokenizer.warmup=1", "tokenizer.batch=2", "tokenizer.eval_fields=1", "tokenizer.window=3",
    "model.dim=16", "model.depth=2", "model.heads=2", "model.expert_dim=16", "model.num_experts=2", "model.moe_every=1",
    "train.max_steps=2", "train.log_every=1", "train.route_every=2", "train.val_every=2", "train.ckpt_every=2",
    "train.micro_batch=2", "train.warmup_steps=1", "train.peak_flops=1.0e+9", "data.lanes=1", "data.shuffle_buffer=8",
    "eval.batch=4",
]


def _trajectory(domain: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(u [T, 3, N, N, N] float32, mask [N, N, N] uint8) of one synthetic trajectory."""
    grid = SpectralGrid(GRID)
    gen = torch.Generator().manual_seed(seed)
    fluct = grid.random_solenoidal(kmax=4.0, rms=0.3, generator=gen)
    mask = np.zeros((GRID,) * 3, np.uint8)
    if domain == "channel":
        frames = [torch.roll(fluct, t, dims=1) + torch.tensor([1.0, 0, 0], dtype=fluct.dtype).view(3, 1, 1, 1)
                  for t in range(FRAMES)]
    else:
        x = grid.x_CXYZ - math.pi
        mask[(x**2).sum(0).sqrt().numpy() < 1.2] = 1
        frames = [fluct * 0.8**t + torch.tensor([0.1, 0, 0], dtype=fluct.dtype).view(3, 1, 1, 1)
                  for t in range(FRAMES)]
    return torch.stack(frames).float().numpy(), mask


def write_raw(root: Path) -> None:
    """ROOT/raw/<split>/<domain>-<traj:06d>.tar plus manifest.json (DESIGN.md's raw contract)."""
    shards, counts, sums = [], {}, {}
    for d_code, domain in enumerate(("channel", "porous")):
        index = 0
        for split, n in SPLITS.items():
            for _ in range(n):
                u_TCXYZ, mask = _trajectory(domain, 100 * d_code + index)
                rel = f"{split}/{domain}-{index:06d}.tar"
                with AtomicShardWriter(Path(root) / "raw" / rel) as w:
                    for t in range(FRAMES):
                        w.write(f"{domain}_{index:05d}_{t:05d}", {
                            "u.npy": u_TCXYZ[t], "mask.npy": mask,
                            "meta.json": {"domain": domain, "trajectory": index, "t": 0.5 * t, "frame": t,
                                          "dt": 0.5, "grid": GRID, "split": split}})
                shards.append({"path": rel, "split": split, "domain": domain, "trajectory": index,
                               "samples": w.count, "sha256": w.sha256})
                counts.setdefault(split, {})[domain] = {"trajectories": n, "samples": n * FRAMES}
                if split == "train":
                    sums.setdefault(domain, []).append(u_TCXYZ.astype(np.float64))
                index += 1
    stats = {}
    for domain, arrays in sums.items():
        u_C = np.concatenate([a.transpose(1, 0, 2, 3, 4).reshape(3, -1) for a in arrays], axis=1)
        stats[domain] = {"mean": u_C.mean(1).tolist(), "std": u_C.std(1).tolist(), "voxels": u_C.shape[1]}
    write_json_atomic(Path(root) / "raw" / "manifest.json", {
        "format": "shodh-raw-1", "config_sha": "synthetic-test", "grid": GRID, "domains": ["channel", "porous"],
        "frames": FRAMES, "shards": shards, "counts": counts, "stats": stats})


def build(root: Path) -> dict[str, Path]:
    """Raw data, tokenizer, latents, a MoE and a dense run, both evaluated. Returns the run dirs.
    Tracking goes wherever MLFLOW_TRACKING_URI points (the caller sets it)."""
    root = Path(root)
    write_raw(root)
    for argv in (["train-tokenizer"], ["encode"]):
        assert main([*argv, "--profile", "smoke", "--root", str(root), *FAST]) == 0, argv
    runs = {}
    for name, kind in (("moe", "moe"), ("dense", "dense_active")):
        assert main(["pretrain", "--profile", "smoke", "--root", str(root), "--run-name", name, *FAST,
                     f"model.kind={kind}"]) == 0
        runs[name] = root / "runs" / "shodh" / name
        assert main(["evaluate", "--profile", "smoke", "--root", str(root), "--run", str(runs[name]), *FAST]) == 0
    return runs
