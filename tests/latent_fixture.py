"""Tiny synthetic latent workspace for pretraining tests: no simulator, no tokenizer needed.

Two domains with different dynamics, so routing has something to find: `channel` advects
(z_{t+1} = 0.95 * z_t shifted one voxel along x), `porous` decays and mixes channels
(z_{t+1} = 0.7 * R z_t + 0.5, R a fixed channel rotation). Layout and manifest follow DESIGN.md.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shodh.io import AtomicShardWriter, write_json_atomic

TOKENIZER_ID = "test-tokenizer-0001"


def _trajectory(domain: str, rng: np.random.Generator, frames: int, channels: int) -> np.ndarray:
    z = rng.standard_normal((channels, 16, 16, 16)).astype(np.float32)
    rot = np.roll(np.eye(channels, dtype=np.float32), 1, axis=0)
    out = [z]
    for _ in range(frames - 1):
        if domain == "channel":
            z = 0.95 * np.roll(z, 1, axis=1) + 0.05 * rng.standard_normal(z.shape).astype(np.float32)
        else:
            z = 0.7 * np.einsum("dc,cxyz->dxyz", rot, z) + 0.5
        out.append(z.astype(np.float32))
    return np.stack(out)


def make_latents(root: Path, channels: int = 4, window: int = 3, windows_per_traj: int = 2,
                 trajectories: dict[str, int] | None = None, seed: int = 0) -> str:
    """Write ROOT/tokenizer/tokenizer.json and ROOT/latents/<id>/ (one shard per trajectory); return the id.
    Trajectory ids are per domain and unique across splits, as the manifest contract requires."""
    root = Path(root)
    trajectories = trajectories or {"train": 2, "val": 1}
    rng = np.random.default_rng(seed)
    base = root / "latents" / TOKENIZER_ID
    shards, counts = [], {}
    first = {}  # first trajectory id of each split
    for split, n in trajectories.items():
        first[split] = sum(trajectories[s] for s in first)
        for domain in ("channel", "porous"):
            for traj in range(first[split], first[split] + n):
                z_TCXYZ = _trajectory(domain, rng, window * windows_per_traj, channels)
                rel = f"{split}/{domain}-{traj:06d}.tar"
                with AtomicShardWriter(base / rel) as w:
                    for k in range(windows_per_traj):
                        t0 = k * window
                        w.write(f"{domain}_{traj:05d}_{t0:05d}", {
                            "z.npy": z_TCXYZ[t0:t0 + window],
                            "meta.json": {"domain": domain, "trajectory": traj, "t0": t0, "dt": 1.0,
                                          "tokenizer_id": TOKENIZER_ID, "split": split}})
                shards.append({"path": rel, "domain": domain, "split": split, "trajectory": traj,
                               "samples": w.count, "sha256": w.sha256})
                counts.setdefault(split, {}).setdefault(domain, 0)
                counts[split][domain] += w.count
    write_json_atomic(base / "manifest.json", {
        "tokenizer_id": TOKENIZER_ID, "channels": channels, "window": window, "domains": ["channel", "porous"],
        "stats": {"mean": [0.0] * channels, "std": [1.0] * channels}, "counts": counts, "shards": shards})
    write_json_atomic(root / "tokenizer" / "tokenizer.json", {"id": TOKENIZER_ID})
    return TOKENIZER_ID
