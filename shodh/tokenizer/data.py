"""Raw field shards as the tokenizer reads them: manifest checks and a shuffled field stream."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from shodh.errors import ConfigError, DataError
from shodh.io import iter_shard, read_json
from shodh.workspace import raw_dir, raw_manifest_path


def load_raw_manifest(root: Path, grid: int) -> dict:
    """ROOT/raw/manifest.json, checked against the configured grid (`sim.grid`)."""
    path = raw_manifest_path(root)
    manifest = read_json(path, "raw manifest (run `shodh simulate` first)")
    for key in ("grid", "shards", "stats", "domains"):
        if key not in manifest:
            raise DataError(f"{path}: missing key '{key}'")
    if manifest["grid"] != grid:
        raise ConfigError(f"sim.grid: is {grid} but the raw data in {path} has grid {manifest['grid']}; "
                          f"pass sim.grid={manifest['grid']} or the matching --profile")
    return manifest


def shards_of(manifest: dict, root: Path, split: str) -> list[dict]:
    """Manifest shard records of one split, each with its absolute `file`."""
    return [{**s, "file": raw_dir(root) / s["path"]} for s in manifest["shards"] if s["split"] == split]


def frame(sample: dict, shard: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """(u [3,N,N,N] float32, mask [N,N,N] uint8, meta) of one decoded raw sample, checked."""
    key = sample["__key__"]
    for member in ("u.npy", "mask.npy", "meta.json"):
        if member not in sample:
            raise DataError(f"{shard}: sample '{key}' has no member '{member}'")
    u, mask = sample["u.npy"], sample["mask.npy"]
    n = mask.shape[-1] if mask.ndim == 3 else -1
    if u.shape != (3, n, n, n) or mask.shape != (n, n, n):
        raise DataError(f"{shard}: sample '{key}': u.npy {u.shape} / mask.npy {mask.shape} are not [3,N,N,N] / [N,N,N]")
    if not np.isfinite(u).all():
        raise DataError(f"{shard}: sample '{key}': u.npy contains NaN or inf")
    return u.astype(np.float32), mask, sample["meta.json"]


def stream_fields(shards: list[dict], seed: int, buffer: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, str]]:
    """Endless (u [3,N,N,N], mask [N,N,N], domain) stream: shard order reshuffled each pass,
    fields drawn at random from a buffer of `buffer` fields (memory stays bounded)."""
    rng = random.Random(seed)
    pool: list = []
    while True:
        order = list(shards)
        rng.shuffle(order)
        for shard in order:
            for sample in iter_shard(shard["file"]):
                u, mask, meta = frame(sample, str(shard["file"]))
                pool.append((torch.from_numpy(u), torch.from_numpy(mask.astype(np.float32)), shard["domain"]))
                if len(pool) > buffer:
                    yield pool.pop(rng.randrange(len(pool)))
        rng.shuffle(pool)
        while len(pool) > buffer // 2:
            yield pool.pop()
