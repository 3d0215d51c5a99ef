"""`shodh encode`: raw field shards -> latent shards of trajectory windows, for pretraining.

Layout: ROOT/latents/<tokenizer-id>/<split>/<domain>-<traj:06d>.tar, one shard per trajectory,
one sample per window of T = tokenizer.window frames, key `<domain>_<traj:05d>_<t0:05d>`:
`z.npy` [T, C, 16, 16, 16] in `tokenizer.latent_dtype` (float32, or float16: half the bytes the
loader reads, hashes and ships; raw encoder output, NOT normalized) and `meta.json`
{domain, trajectory, t0, dt, tokenizer_id, split, frames}. Windows start every T-1 frames, so
consecutive windows share one frame and every consecutive pair (t, t+1) lies in exactly one
window; the last window may be shorter (>= 2 frames).

manifest.json beside the split folders: tokenizer_id, channels, window, domains, shards
[{path (relative to the manifest's folder), split, domain, trajectory, samples, sha256}],
dtype, counts, stats {mean [C], std [C], per_domain {domain: {mean, std}}} over the train split's
frames (each frame once, as stored: float16 latents' stats are those of the rounded values).
Every finished trajectory leaves parts/<domain>-<traj>.json; a rerun
skips trajectories whose part record matches both the raw shard's and the latent shard's
sha256, so encoding resumes after a crash. Shards are split round-robin over ranks; rank 0
merges the manifest once all ranks are done.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from tqdm import tqdm

from shodh.distributed import DistInfo
from shodh.errors import DataError
from shodh.io import (
    AtomicShardWriter,
    RunLock,
    collect_parts,
    moments,
    read_json,
    remove_stale_temporaries,
    sha256_file,
    split_counts,
    write_json_atomic,
)
from shodh.tokenizer.data import load_raw_manifest, raw_frames, shards_of
from shodh.tokenizer.model import Tokenizer, load_tokenizer
from shodh.tokenizer.train import setup_process
from shodh.workspace import LATENT, SPLITS, latent_dir, lock_file, part_file, shard_file

log = logging.getLogger(__name__)
MANIFEST_FORMAT = "shodh-latents-1"


def windows(frames: int, window: int) -> list[tuple[int, int]]:
    """[t0, t1) frame ranges: length `window`, stride window-1, last one possibly shorter (>= 2)."""
    out, t0 = [], 0
    while t0 < frames - 1:
        out.append((t0, min(t0 + window, frames)))
        t0 += window - 1
    return out


def _part(out: Path, record: dict) -> Path:
    return part_file(out, record["domain"], record["trajectory"])


def _shard(out: Path, record: dict) -> Path:
    return shard_file(out, record["split"], record["domain"], record["trajectory"])


def is_done(out: Path, record: dict, window: int, dtype: str) -> bool:
    part, shard = _part(out, record), _shard(out, record)
    if not (part.exists() and shard.exists()):
        return False
    done = read_json(part, "latent trajectory record")
    return (done.get("raw_sha256") == record["sha256"] and done.get("window") == window
            and done.get("dtype", "float32") == dtype and done.get("sha256") == sha256_file(shard))


def stored(z_TCxyz: np.ndarray, dtype: str, where: str) -> np.ndarray:
    """The latents as `tokenizer.latent_dtype` stores them; refuses values float16 cannot hold."""
    if dtype == "float32":
        return z_TCxyz
    largest, limit = float(np.abs(z_TCxyz).max()), float(np.finfo(np.float16).max)
    if largest > limit:
        raise DataError(f"{where}: latents reach |z| = {largest:.3g}, beyond float16's {limit:g}; "
                        f"encode with tokenizer.latent_dtype=float32")
    return z_TCxyz.astype(np.float16)


@torch.no_grad()
def encode_trajectory(tok: Tokenizer, record: dict, out: Path, window: int, batch: int, dtype: str,
                      bar: tqdm | None) -> dict:
    """Encode one raw trajectory shard (a `shards_of` record) into its latent shard; returns its part record.

    Nothing is written unless the whole raw shard verified (checksum, count, meta, values: the
    check ends with its last frame, and every frame is read before encoding) and every latent is finite.
    """
    raw_file = record["file"]
    u_list, masks, metas = [], [], []
    for u, mask, meta in raw_frames(record):
        if u.shape[-1] != tok.grid:
            raise DataError(f"{raw_file}: frame {meta.get('frame', len(u_list))} has grid {u.shape[-1]}, "
                            f"tokenizer {tok.id} expects {tok.grid}")
        u_list.append(u), masks.append(mask), metas.append(meta)
    if len(u_list) < 2:
        raise DataError(f"{raw_file}: {len(u_list)} frame(s); encoding windows needs at least 2")
    z_chunks = []
    for i in range(0, len(u_list), batch):
        u_t = torch.from_numpy(np.stack(u_list[i : i + batch]))
        m_t = torch.from_numpy(np.stack(masks[i : i + batch]).astype(np.float32))
        z_chunks.append(tok.encode(u_t, m_t, record["domain"]).float().cpu())
        if bar is not None:
            bar.update(len(u_t))
    z_TCxyz = torch.cat(z_chunks).numpy()
    finite_T = np.isfinite(z_TCxyz.reshape(len(z_TCxyz), -1)).all(axis=1)
    if not finite_T.all():
        t = int(np.argmin(finite_T))
        raise DataError(f"{raw_file}: frame {metas[t].get('frame', t)} encodes to NaN/inf latents with tokenizer "
                        f"{tok.id}; no latent shard written (check or retrain the tokenizer)")
    z_TCxyz = stored(z_TCxyz, dtype, raw_file)
    shard = _shard(out, record)
    with AtomicShardWriter(shard) as writer:
        for t0, t1 in windows(len(z_TCxyz), window):
            meta = {"domain": record["domain"], "trajectory": record["trajectory"], "t0": t0, "frames": t1 - t0,
                    "dt": metas[t0].get("dt"), "t": metas[t0].get("t"), "tokenizer_id": tok.id, "split": record["split"]}
            writer.write(f"{record['domain']}_{record['trajectory']:05d}_{t0:05d}", {"z.npy": z_TCxyz[t0:t1], "meta.json": meta})
    z64 = z_TCxyz.astype(np.float64)
    part = {"path": str(shard.relative_to(out)), "split": record["split"], "domain": record["domain"],
            "trajectory": record["trajectory"], "samples": writer.count, "sha256": writer.sha256,
            "frames": len(z_TCxyz), "window": window, "dtype": dtype, "raw_sha256": record["sha256"], "tokenizer_id": tok.id,
            "sum": z64.sum(axis=(0, 2, 3, 4)).tolist(), "sumsq": (z64**2).sum(axis=(0, 2, 3, 4)).tolist(),
            "voxels": int(z64[:, 0].size)}
    write_json_atomic(_part(out, record), part)
    return part


def merge_manifest(out: Path, tok: Tokenizer, raw_manifest: dict, window: int, dtype: str) -> dict:
    """Collect every trajectory's part record into manifest.json (train-split latent stats)."""
    parts = collect_parts([_part(out, record) for record in raw_manifest["shards"]], out)
    mixed = sorted({p.get("dtype", "float32") for p in parts} - {dtype})
    if mixed:  # is_done re-encodes another dtype's trajectories; two encodes at once with different dtypes could not
        raise DataError(f"{out}: trajectory records in {mixed} beside tokenizer.latent_dtype={dtype}; re-run `shodh encode`")
    train = [p for p in parts if p["split"] == "train"]
    domains = list(raw_manifest["domains"])
    stats = {**moments(train), "split": "train",
             "per_domain": {d: moments([p for p in train if p["domain"] == d]) for d in domains
                            if any(p["domain"] == d for p in train)}}
    counts = split_counts(parts, SPLITS, domains, ("samples", "frames"))
    keep = ("path", "split", "domain", "trajectory", "samples", "frames", "sha256")
    manifest = {"format": MANIFEST_FORMAT, "tokenizer_id": tok.id, "channels": tok.channels, "window": window,
                "dtype": dtype, "latent_shape": [tok.channels, LATENT, LATENT, LATENT], "grid": tok.grid, "domains": domains,
                "raw_config_sha": raw_manifest.get("config_sha"), "normalized": False,
                "shards": [{k: p[k] for k in keep} for p in parts], "counts": counts, "stats": stats}
    write_json_atomic(out / "manifest.json", manifest)
    return manifest


def encode(cfg, root: Path, info: DistInfo) -> dict | None:
    """Encode this rank's share of raw trajectories; rank 0 returns the merged manifest."""
    tcfg = cfg.tokenizer
    device = setup_process(tcfg, info)
    raw_manifest = load_raw_manifest(root, cfg.sim.grid)
    tok = load_tokenizer(root, device)
    if tok.grid != raw_manifest["grid"]:
        raise DataError(f"{Path(root) / 'tokenizer' / 'tokenizer.json'}: tokenizer {tok.id} has grid {tok.grid}, "
                        f"raw data has {raw_manifest['grid']}; retrain with `shodh train-tokenizer`")
    out = latent_dir(root, tok.id)
    with RunLock(lock_file(out, f"rank{info.rank}"), f"encoding (rank {info.rank})"):
        _encode_mine(tok, raw_manifest, root, out, tcfg, info)
    if info.distributed:
        torch_dist.barrier()
    return merge_manifest(out, tok, raw_manifest, tcfg.window, tcfg.latent_dtype) if info.is_main else None


def _encode_mine(tok: Tokenizer, raw_manifest: dict, root: Path, out: Path, tcfg, info: DistInfo) -> None:
    mine = shards_of(raw_manifest, root, None)[info.rank :: info.world_size]
    # A killed encode leaves `<file>.tmp-<pid>`; only this rank writes its trajectories' files
    # (and rank 0 the manifest), so it alone clears their debris.
    remove_stale_temporaries([p for r in mine for p in (_shard(out, r), _part(out, r))]
                             + ([out / "manifest.json"] if info.is_main else []))
    todo = [r for r in mine if not is_done(out, r, tcfg.window, tcfg.latent_dtype)]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d trajectories already encoded", len(mine) - len(todo), len(mine))
    t0 = time.perf_counter()
    total = sum(r["samples"] for r in todo)
    with tqdm(total=total, desc=f"encode {tok.id}", unit="frame", disable=not info.is_main) as bar:
        for record in todo:
            bar.set_postfix_str(str(_shard(out, record).relative_to(out)))
            encode_trajectory(tok, record, out, tcfg.window, tcfg.encode_batch, tcfg.latent_dtype, bar)
    log.info("rank %d encoded %d trajectories (%d frames) in %.1f s", info.rank, len(todo), total, time.perf_counter() - t0)
