"""Latent loader throughput per worker against the rate a GPU consumes at the paper profile.

Builds synthetic latent shards of the contract form at the paper profile's shapes (C = 8 latent
channels, 16^3, windows of T = 4 frames, i.e. 3 pairs per window) in a temporary workspace, once
with float32 and once with float16 `z.npy` (`tokenizer.latent_dtype`), and measures for each:
- decode cost per sample (one sample = one (z_t, z_{t+1}) pair, the unit a training step consumes):
  reading the tar, sha256 of every byte, `np.load(allow_pickle=False)`, the meta and finiteness
  checks and normalization, in this process;
- `LatentStream` samples/s at the paper micro-batch (16), float32 and float16 batches (`data.batch_dtype`),
  with 0 workers (in-process) and 1, 2, ... DataLoader workers, each with the shard cache off
  (`data.cache_mb=0`: every resampled shard is read and decoded again) and warm (timed after
  `--warmup` batches, by which every shard has been read once): the per-worker rate and how it scales
  (each worker on its own core: on a machine with fewer free cores than workers the scaling figure
  is capped by the machine, not the loader).
Then compares the rates with the samples/s per GPU that `shodh plan` estimates for the paper profile
(one H200; 4 nodes x 8 GPUs): for the training process's own core (in-process, warm cache) and for the
workers a 16-core node can spare. The rates are MEASURED on this CPU; what a GPU node's cores deliver
is extrapolated from them (stated as such in the output).

    .venv/bin/python benchmarks/bench_loader.py [--batches 100] [--warmup 100] [--workers 0,1,2] [--threads 1] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from shodh.config import load_config
from shodh.data.loader import DataConfig, LatentStream, _source, _split_shards, latent_dir, read_manifest
from shodh.io import AtomicShardWriter, write_json_atomic
from shodh.train.plan import Hardware, make_plan

TOK, C, T, GRID, BATCH = "bench-tok", 8, 4, 16, 16
DOMAINS = ["channel", "porous"]
SHARDS_PER_DOMAIN, WINDOWS_PER_SHARD = 4, 10  # 30 pairs per shard, 240 pairs in all
# The GPU node the paper layout runs on: 16 CPU cores; one core per training process.
NODE_CORES = 16


def build(root: Path, dtype: str) -> None:
    """Synthetic latent shards and manifest of the contract form (what `shodh encode` writes)."""
    rng = np.random.default_rng(0)
    base, shards = latent_dir(root, TOK), []
    for d, domain in enumerate(DOMAINS):
        for s in range(SHARDS_PER_DOMAIN):
            traj = d * SHARDS_PER_DOMAIN + s
            rel = f"train/{domain}-{traj:06d}.tar"
            with AtomicShardWriter(base / rel) as w:
                for i in range(WINDOWS_PER_SHARD):
                    t0 = i * (T - 1)
                    z = (3.0 * rng.standard_normal((T, C, GRID, GRID, GRID), dtype=np.float32) + 1.0).astype(dtype)
                    meta = {"domain": domain, "trajectory": traj, "t0": t0, "dt": 0.1, "tokenizer_id": TOK,
                            "split": "train"}
                    w.write(f"{domain}_{traj:05d}_{t0:05d}", {"z.npy": z, "meta.json": meta})
            shards.append({"path": rel, "split": "train", "domain": domain, "trajectory": traj,
                           "samples": w.count, "sha256": w.sha256})
    write_json_atomic(base / "manifest.json", {
        "tokenizer_id": TOK, "channels": C, "window": T, "dtype": dtype, "domains": DOMAINS, "shards": shards,
        "counts": {}, "stats": {"mean": [1.0] * C, "std": [3.0] * C}})


def decode_ms_per_sample(root: Path, cfg: DataConfig, repeats: int = 3) -> float:
    """Median over repeats of (read + hash + decode + check + normalize every shard) / pairs."""
    manifest = read_manifest(root, TOK)
    source = _source(manifest, cfg, TOK)
    shards = _split_shards(manifest, cfg, root, TOK, "train")  # every shard build() wrote
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        pairs = sum(z.shape[0] - 1 for s in shards for z in source.read(s)[0])
        times.append((time.perf_counter() - t) / pairs)
    return 1e3 * statistics.median(times)


def stream_rate(root: Path, cfg: DataConfig, workers: int, batches: int, warmup: int) -> float:
    """samples/s of one LatentStream over `batches` batches after `warmup` batches (workers started, shards cached)."""
    lanes = max(cfg.lanes, workers)
    stream = LatentStream(dataclasses.replace(cfg, workers=workers, lanes=lanes), root, TOK, "train", BATCH, 0, 1,
                          seed=0)
    it = iter(stream)
    for _ in range(warmup):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    rate = batches * BATCH / (time.perf_counter() - t)
    it.close()
    return rate


def paper_rates() -> dict[str, float]:
    """samples/s per GPU `shodh plan` estimates for the paper profile (its default hardware assumptions)."""
    cfg = load_config("paper")
    one = load_config("paper", ["model.ep_size=1"])
    return {"1 x H200 (ep_size 1)": make_plan(one, 1, 1, Hardware(memory_gib=141)).samples_per_s_per_rank,
            "4 nodes x 8 GPUs": make_plan(cfg, 4, 8, Hardware()).samples_per_s_per_rank}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batches", type=int, default=100, help="batches timed per (dtype, cache, workers)")
    ap.add_argument("--warmup", type=int, default=100, help="batches before timing (reads every shard at least once)")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader worker counts, comma-separated")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of this (the main) process")
    ap.add_argument("--out", default="")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    worker_counts = [int(w) for w in args.workers.split(",")]
    cfg = DataConfig(weights={"channel": 0.5, "porous": 0.5}, shuffle_buffer=256, lanes=4, on_error="raise")
    results = {}
    for shard_dtype, batch_dtypes in (("float32", ("float32",)), ("float16", ("float32", "float16"))):
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            build(root, shard_dtype)
            shard_bytes = sum(p.stat().st_size for p in latent_dir(root, TOK).glob("train/*.tar"))
            decode_ms = decode_ms_per_sample(root, cfg)
            for batch_dtype in batch_dtypes:
                for cache, cache_mb in (("off", 0), ("warm", cfg.cache_mb)):
                    c = dataclasses.replace(cfg, batch_dtype=batch_dtype, cache_mb=cache_mb)
                    results[f"{shard_dtype} shards, {batch_dtype} batches, cache {cache}"] = {
                        "decode_ms_per_sample": decode_ms,
                        "shard_bytes_per_sample": shard_bytes / (len(DOMAINS) * SHARDS_PER_DOMAIN * WINDOWS_PER_SHARD
                                                                 * (T - 1)),
                        "samples_per_s": {w: stream_rate(root, c, w, args.batches, args.warmup) for w in worker_counts}}
    need = paper_rates()

    print(f"latent loader: C={C}, 16^3, windows T={T} ({T - 1} pairs), batch {BATCH}; sample = one pair; "
          f"main process torch threads {args.threads}; {args.batches} batches timed after {args.warmup}")
    print("| z.npy / data.batch_dtype / shard cache | bytes on disk per sample | decode ms per sample | " +
          " | ".join(f"{w} workers samples/s" if w else "in-process samples/s" for w in worker_counts) + " |")
    print("|---|---|---|" + "---|" * len(worker_counts))
    for name, r in results.items():
        print(f"| {name} | {r['shard_bytes_per_sample']:,.0f} | {r['decode_ms_per_sample']:.3f} | "
              + " | ".join(f"{r['samples_per_s'][w]:,.0f}" for w in worker_counts) + " |")
    best = results["float16 shards, float16 batches, cache warm"]["samples_per_s"]
    in_process = best.get(0, 0.0)
    per_worker = best.get(1, best[worker_counts[-1]])
    cold = results["float16 shards, float16 batches, cache off"]["samples_per_s"]
    print(f"\nfloat16 shards and batches, measured here: in-process with a warm cache {in_process:,.0f} samples/s "
          f"({1e3 * BATCH / in_process:.2f} ms of the training process per micro batch of {BATCH}); "
          f"1 worker {per_worker:,.0f} warm, {cold.get(1, 0.0):,.0f} cold (cache off)")
    spare = {"1 x H200 (ep_size 1)": NODE_CORES - 1, "4 nodes x 8 GPUs": (NODE_CORES - 8) // 8}
    print("EXTRAPOLATED to a 16-core GPU node (the paper's shards held in each rank's cache; each core delivers "
          "the rate measured here):")
    for layout, rate in need.items():
        workers = spare[layout]
        print(f"  {layout}: the paper model consumes ~{rate:,.0f} samples/s per GPU (shodh plan estimate): "
              f"in-process {in_process / rate:.1f}x that rate; {workers} spare core(s) per GPU as workers "
              f"{workers * per_worker / rate:.1f}x ({int(np.ceil(rate / per_worker))} worker(s) per GPU needed)")
    summary = {"batch": BATCH, "channels": C, "window": T, "threads": args.threads, "results": results,
               "paper_samples_per_s_per_gpu": need, "in_process_warm_samples_per_s": in_process,
               "per_worker_warm_samples_per_s": per_worker}
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
