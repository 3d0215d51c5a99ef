"""Raw field shards as the tokenizer reads them: manifest checks, verified frames, a shuffled field stream.

Every raw reader (tokenizer training and held-out evaluation, audit, encode, evaluate) goes
through `raw_frames`: the shard's sha256 and sample count are checked against the manifest
while it is streamed, each sample's meta against its manifest entry, and each frame's dtype
and magnitude (`frame`).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from shodh.errors import ConfigError, DataError
from shodh.io import check_manifest_shards, iter_shard, read_json
from shodh.physics.simulate import check_solver
from shodh.physics.solver import band_limit
from shodh.workspace import raw_dir, raw_manifest_path

RAW_REMEDY = "re-run `shodh simulate` (it regenerates shards that differ from their record)"
# A stored |u| above PLAUSIBLE x (|mean| + std) of the domain's train statistics (worst component)
# is refused. Turbulent extremes are a few std from the mean; 1e3 leaves a wide margin while a
# field written in the wrong units or scaled by mistake (1e30) is caught before it is learned.
PLAUSIBLE = 1e3


def load_raw_manifest(root: Path, grid: int | None = None) -> dict:
    """ROOT/raw/manifest.json, its shard list checked (complete entries, each trajectory once) and,
    unless `grid` is None, checked against the configured grid (`sim.grid`)."""
    path = raw_manifest_path(root)
    manifest = read_json(path, "raw manifest (run `shodh simulate` first)")
    for key in ("grid", "shards", "stats", "domains"):
        if key not in manifest:
            raise DataError(f"{path}: missing key '{key}'")
    check_manifest_shards(manifest["shards"], str(path), RAW_REMEDY)
    check_solver(manifest, path, remedy="regenerate it with `shodh simulate --overwrite`")
    if grid is not None and manifest["grid"] != grid:
        raise ConfigError(f"sim.grid: is {grid} but the raw data in {path} has grid {manifest['grid']}; "
                          f"pass sim.grid={manifest['grid']} or the matching --profile")
    return manifest


def data_band(manifest: dict) -> int | None:
    """The raw data's band limit |k_i| <= band, which the decoder then respects (None: no limit).

    Simulated fields are dealiased by the solver's 2/3 rule (`physics.solver.band_limit`);
    imported fields may hold energy in every mode, so a workspace with imported domains has none.
    """
    if manifest.get("imported") or not isinstance(manifest.get("generator"), dict):
        return None
    return band_limit(int(manifest["grid"]))


def plausible_limit(manifest: dict, root: Path, domain: str) -> float:
    """Largest |u| accepted for `domain`: PLAUSIBLE x max over components of (|mean| + std)."""
    stats = manifest["stats"].get(domain) if isinstance(manifest["stats"], dict) else None
    try:
        scale = max(abs(float(m)) + float(s) for m, s in zip(stats["mean"], stats["std"]))
    except (TypeError, KeyError, ValueError):
        raise DataError(f"{raw_manifest_path(root)}: stats has no train mean/std for domain '{domain}'") from None
    if not np.isfinite(scale) or scale <= 0:
        raise DataError(f"{raw_manifest_path(root)}: stats of domain '{domain}' give |mean| + std = {scale}; "
                        f"cannot bound its fields")
    return PLAUSIBLE * scale


def shards_of(manifest: dict, root: Path, split: str | None) -> list[dict]:
    """Manifest shard records of one split (all splits for None), each with its absolute `file`
    and the largest plausible |u| of its domain, `limit`."""
    limits = {d: plausible_limit(manifest, root, d) for d in {s["domain"] for s in manifest["shards"]}}
    return [{**s, "file": raw_dir(root) / s["path"], "limit": limits[s["domain"]]}
            for s in manifest["shards"] if split is None or s["split"] == split]


def frame(sample: dict, shard: str, limit: float) -> tuple[np.ndarray, np.ndarray, dict]:
    """(u [3,N,N,N] float32, mask [N,N,N] uint8, meta) of one decoded raw sample, checked: shapes,
    u float32/float64, finite and max |u| <= `limit`, mask uint8/bool of 0s and 1s. Never a silent cast."""
    key = sample["__key__"]
    for member in ("u.npy", "mask.npy", "meta.json"):
        if member not in sample:
            raise DataError(f"{shard}: sample '{key}' has no member '{member}'")
    u, mask = sample["u.npy"], sample["mask.npy"]
    n = mask.shape[-1] if mask.ndim == 3 else -1
    if u.shape != (3, n, n, n) or mask.shape != (n, n, n):
        raise DataError(f"{shard}: sample '{key}': u.npy {u.shape} / mask.npy {mask.shape} are not [3,N,N,N] / [N,N,N]")
    if u.dtype not in (np.float32, np.float64):
        raise DataError(f"{shard}: sample '{key}': u.npy has dtype {u.dtype}, expected float32 or float64")
    if not np.isfinite(u).all():
        raise DataError(f"{shard}: sample '{key}': u.npy contains NaN or inf")
    peak = float(np.abs(u).max())
    if peak > limit:
        raise DataError(f"{shard}: sample '{key}': u.npy has max |u| = {peak:.3g}, above the plausible "
                        f"{limit:.3g} ({PLAUSIBLE:g} x (|mean| + std) of the domain's train statistics); "
                        f"wrong units or scaling?")
    if mask.dtype not in (np.uint8, np.bool_):
        raise DataError(f"{shard}: sample '{key}': mask.npy has dtype {mask.dtype}, expected uint8 or bool")
    if mask.dtype == np.uint8 and mask.max(initial=0) > 1:
        raise DataError(f"{shard}: sample '{key}': mask.npy holds {int(mask.max())}, expected only 0 and 1")
    return u.astype(np.float32), mask.astype(np.uint8), sample["meta.json"]


def raw_frames(record: dict) -> Iterator[tuple[np.ndarray, np.ndarray, dict]]:
    """Checked frames (`frame`) of one raw shard, a `shards_of` record, in order.

    The shard is verified against the record while it streams: each sample's meta (split,
    domain, trajectory) at once, sha256 and sample count after the last frame, so a DataError
    can come at the end: read to the end before acting irreversibly on the frames.
    """
    shard = str(record["file"])
    for sample in iter_shard(shard, record, RAW_REMEDY):
        yield frame(sample, shard, record["limit"])


def domain_frames(manifest: dict, root: Path, split: str, domain: str,
                  limit: int = 0) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(u, mask) of the first `limit` frames (0: all) of one domain in one split, shard by shard.
    A shard a frame came from is read to its end (its checksum is verified there, so a DataError
    may follow the frames it names); no shard is opened once `limit` frames were given."""
    seen = 0
    for shard in (s for s in shards_of(manifest, root, split) if s["domain"] == domain):
        if limit and seen >= limit:
            return
        for u, mask, _ in raw_frames(shard):
            if not limit or seen < limit:
                seen += 1
                yield u, mask


def stream_fields(shards: list[dict], seed: int, buffer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
    """Endless (u [3,N,N,N], mask [N,N,N], domain) stream: shard order reshuffled each pass,
    fields drawn at random from a buffer of `buffer` fields (memory stays bounded).

    Shards (`shards_of` records) are verified while streamed (`raw_frames`): a shard whose
    checksum or count differs from the manifest raises when that shard ends. Its fields may
    already have entered the buffer and been trained on by then (and a checkpoint written); the
    error stops the run, naming the shard, and no tokenizer.pt is written.
    """
    rng = random.Random(seed)
    pool: list = []
    while True:
        order = list(shards)
        rng.shuffle(order)
        for shard in order:
            for u, mask, _ in raw_frames(shard):
                pool.append((torch.from_numpy(u), torch.from_numpy(mask.astype(np.float32)), shard["domain"]))
                if len(pool) > buffer:
                    yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        while len(pool) > buffer // 2:
            yield pool.pop()
