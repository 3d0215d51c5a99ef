"""Latent loader throughput vs. the consumption rate of a training step.

Builds synthetic latent shards of the contract form (C=8, 16^3, windows of T=8 frames) in a
temporary workspace, then measures:
- decode cost: reading + decoding (`allow_pickle=False`) + normalizing one window, per sample
  and per (z_t, z_{t+1}) pair;
- `LatentStream` throughput in samples/s (one sample = one pair) with 0, 1 and 2 workers;
- consumption: samples/s of a forward/backward/AdamW step of a STAND-IN model (the MoE latent
  transformer is not there yet): einops patchify 2^3 -> 512 tokens, linear embed to 128 dims,
  a 4-layer torch nn.TransformerEncoder (4 heads, FFN 512), unembed, MSE to z_{t+1}; batch 8;
- the ratio loader / consumption (goal >= 20x), and the training step fed by the loader
  (workers as in the demo profile) against the same step on a fixed tensor, i.e. the stall.

    .venv/bin/python benchmarks/bench_loader.py [--batches 60] [--steps 12]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from einops import rearrange
from torch import nn

from shodh.data.loader import DataConfig, LatentStream, _Shard, _source, latent_dir, read_manifest
from shodh.io import AtomicShardWriter, write_json_atomic

TOK, C, T, GRID, PATCH = "bench-tok", 8, 8, 16, 2
DOMAINS = ["channel", "porous"]


def build(root: Path, shards_per_domain: int, windows_per_shard: int) -> None:
    rng = np.random.default_rng(0)
    base, shards = latent_dir(root, TOK), []
    for d, domain in enumerate(DOMAINS):
        for s in range(shards_per_domain):
            traj = d * shards_per_domain + s
            rel = f"train/{domain}-{traj:06d}.tar"
            with AtomicShardWriter(base / rel) as w:
                for i in range(windows_per_shard):
                    t0 = i * (T - 1)
                    z = rng.standard_normal((T, C, GRID, GRID, GRID), dtype=np.float32)
                    meta = {"domain": domain, "trajectory": traj, "t0": t0, "dt": 0.1, "tokenizer_id": TOK, "split": "train"}
                    w.write(f"{domain}_{traj:05d}_{t0:05d}", {"z.npy": z, "meta.json": meta})
            shards.append({"path": rel, "split": "train", "domain": domain, "trajectory": traj,
                           "samples": w.count, "sha256": w.sha256})
    write_json_atomic(base / "manifest.json", {"tokenizer_id": TOK, "channels": C, "window": T, "domains": DOMAINS,
                                               "shards": shards, "counts": {}, "stats": {"mean": [0.0] * C, "std": [1.0] * C}})


class StandIn(nn.Module):
    """Comparable small latent transformer: 512 tokens x 128 dims (NOT the project's model)."""

    def __init__(self, dim: int = 128, layers: int = 4):
        super().__init__()
        self.embed = nn.Linear(C * PATCH**3, dim)
        layer = nn.TransformerEncoderLayer(dim, 4, 4 * dim, dropout=0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.unembed = nn.Linear(dim, C * PATCH**3)

    def forward(self, z_BCXYZ: torch.Tensor) -> torch.Tensor:
        pattern = "b c (x p) (y q) (z r) -> b (x y z) (p q r c)"
        x_BTP = rearrange(z_BCXYZ, pattern, p=PATCH, q=PATCH, r=PATCH)
        y_BTP = self.unembed(self.blocks(self.embed(x_BTP)))
        g = GRID // PATCH
        return z_BCXYZ + rearrange(y_BTP, "b (x y z) (p q r c) -> b c (x p) (y q) (z r)",
                                   x=g, y=g, z=g, p=PATCH, q=PATCH, r=PATCH)


def train_steps(model, opt, batches) -> float:
    t = time.perf_counter()
    for batch in batches:
        loss = nn.functional.mse_loss(model(batch["z_in"]), batch["z_out"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=60, help="loader batches timed per worker setting")
    ap.add_argument("--steps", type=int, default=12, help="training steps timed")
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    B = args.batch
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, shards_per_domain=4, windows_per_shard=6)
        manifest = read_manifest(root, TOK)
        cfg = DataConfig(weights={"channel": 0.5, "porous": 0.5}, shuffle_buffer=256, workers=0, on_error="raise", lanes=2)

        # Decode cost: read + decode + normalize every window of every shard.
        source = _source(manifest, cfg, TOK)
        shards = [_Shard(f"{latent_dir(root, TOK)}/{s['path']}", s["domain"], s["samples"], s["split"], s["trajectory"],
                         s["sha256"]) for s in manifest["shards"]]
        t = time.perf_counter()
        n_windows = sum(len(source.read(s)[0]) for s in shards)
        decode_s = (time.perf_counter() - t) / n_windows

        rows = []
        for workers in (0, 1, 2):
            stream = LatentStream(DataConfig(**{**cfg.__dict__, "workers": workers}), root, TOK, "train", B, 0, 1, seed=0)
            it = iter(stream)
            t = time.perf_counter()
            next(it)
            first = time.perf_counter() - t
            t = time.perf_counter()
            for _ in range(args.batches):
                next(it)
            rate = args.batches * B / (time.perf_counter() - t)
            it.close()
            rows.append((workers, first, rate))

        torch.manual_seed(0)
        model = StandIn()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        fixed = {"z_in": torch.randn(B, C, GRID, GRID, GRID), "z_out": torch.randn(B, C, GRID, GRID, GRID)}
        train_steps(model, opt, [fixed] * 2)  # warm-up
        # Steps fed by the loader (workers=1, as in the demo profile) alternate with steps on a
        # fixed tensor, so load from other processes on a shared machine hits both alike.
        fed = LatentStream(DataConfig(**{**cfg.__dict__, "workers": 1}), root, TOK, "train", B, 0, 1, seed=1)
        it = iter(fed)
        next(it)
        fixed_s, fed_s = [], []
        for _ in range(args.steps):
            fixed_s.append(train_steps(model, opt, [fixed]))
            fed_s.append(train_steps(model, opt, [next(it)]))
        it.close()
        step_s, fed_s = float(np.median(fixed_s)), float(np.median(fed_s))
        consume = B / step_s

    print(f"latent loader benchmark: C={C}, {GRID}^3, windows T={T} (7 pairs), batch {B}, "
          f"torch threads {torch.get_num_threads()}")
    print(f"decode (read tar + np.load allow_pickle=False + normalize): {decode_s * 1e3:.2f} ms/window, "
          f"{decode_s / (T - 1) * 1e3:.3f} ms/pair")
    print(f"consumption, STAND-IN transformer fwd+bwd+AdamW (512 tok x 128 d, 4 layers): "
          f"{step_s * 1e3:.0f} ms/step (median) = {consume:.1f} samples/s")
    print()
    print("| workers | first batch (s) | loader samples/s | ratio to consumption |")
    print("|---|---|---|---|")
    for workers, first, rate in rows:
        print(f"| {workers} | {first:.2f} | {rate:.0f} | {rate / consume:.0f}x |")
    print()
    print(f"median training step fed by the loader (workers=1): {fed_s * 1e3:.0f} ms vs {step_s * 1e3:.0f} ms on a fixed "
          f"tensor ({(fed_s / step_s - 1) * 100:+.0f}%)")


if __name__ == "__main__":
    main()
