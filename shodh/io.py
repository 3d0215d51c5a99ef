"""Leaf I/O shared by every stage: atomic writes, JSON, hashing, pickle-free WebDataset shard reading.

A shard is a plain tar of samples; a sample is a key plus members `<key>.<name>` (`u.npy`,
`meta.json`, ...). Writers stream into `<name>.tmp-<pid>` and rename on completion, so a
crash never leaves a half-written shard under the final name. Readers decode `.npy` with
`allow_pickle=False` and `.json` as JSON only, and name the shard and key in every error.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import webdataset as wds

from shodh.errors import DataError


def encode_npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes, where: str) -> np.ndarray:
    try:
        return np.load(io.BytesIO(data), allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DataError(f"{where}: not a valid .npy array ({exc})") from None


def decode_json(data: bytes, where: str) -> Any:
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: not valid JSON ({exc})") from None


def decode_sample(sample: dict, shard: str) -> dict:
    """Decode a raw WebDataset sample (bytes per member) into arrays and dicts."""
    key = sample.get("__key__", "?")
    out: dict[str, Any] = {"__key__": key, "__url__": sample.get("__url__", shard)}
    for name, value in sample.items():
        if name.startswith("__"):
            continue
        where = f"{shard}: sample '{key}', member '{name}'"
        if name.endswith(".npy"):
            out[name] = decode_npy(value, where)
        elif name.endswith(".json"):
            out[name] = decode_json(value, where)
        else:
            raise DataError(f"{where}: unexpected member type (only .npy and .json are read)")
    return out


class AtomicShardWriter:
    """Write samples to `path` atomically; use as a context manager.

    On success the tar is renamed into place and `sha256` / `count` are set; on an exception
    the temporary file is removed and nothing under `path` changes.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = self.path.with_name(f"{self.path.name}.tmp-{os.getpid()}")
        self.count = 0
        self.sha256: str | None = None

    def __enter__(self) -> "AtomicShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.tmp, "wb")
        self._writer = wds.TarWriter(self._file, encoder=False, mtime=0.0)
        return self

    def write(self, key: str, members: dict[str, Any]) -> None:
        sample: dict[str, Any] = {"__key__": key}
        for name, value in members.items():
            if name.endswith(".npy"):
                sample[name] = encode_npy(value)
            elif name.endswith(".json"):
                sample[name] = json.dumps(value, sort_keys=True).encode()
            else:
                raise ValueError(f"member '{name}': only .npy and .json members are written")
        self._writer.write(sample)
        self.count += 1

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            self._writer.close()  # also closes the file object
        except BaseException:
            self.tmp.unlink(missing_ok=True)
            raise
        if exc_type is not None:
            self.tmp.unlink(missing_ok=True)
            return
        with open(self.tmp, "rb+") as f:
            os.fsync(f.fileno())
        self.sha256 = sha256_file(self.tmp)
        os.replace(self.tmp, self.path)


def write_atomic(path: str | Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` fills a sibling temporary file, which is then renamed over `path`: readers see
    the old file or the new one, never a torn write, and a failed write leaves no debris."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def write_text_atomic(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise DataError(f"{path}: {what} not found") from None
    except ValueError as exc:
        raise DataError(f"{path}: {what} is not valid JSON ({exc})") from None


def sha256_json(obj: Any) -> str:
    """Short stable digest of JSON-able data (configs), used to refuse mixing data across configs."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Decoded samples of one local shard, in order; errors name the shard and the key."""
    shard = str(path)
    if not Path(shard).is_file():
        raise DataError(f"{shard}: shard not found")
    pipeline = wds.DataPipeline(wds.SimpleShardList([shard]), wds.tarfile_to_samples(handler=wds.reraise_exception))
    try:
        for sample in pipeline:
            yield decode_sample(sample, shard)
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise DataError(f"{shard}: unreadable or truncated tar ({type(exc).__name__}: {exc})") from None


# ---------------------------------------------------------------- manifests from part records
# simulate and encode both write one part record per finished trajectory (its manifest entry plus
# per-component sums) and merge them into a manifest; these are the shared steps of that merge.


def collect_parts(paths: list[Path], folder: Path) -> list[dict]:
    """Read the part records at `paths`; a missing one is an error naming up to eight of them."""
    missing = [Path(p).stem for p in paths if not Path(p).exists()]
    if missing:
        raise DataError(f"{folder}: cannot write the manifest, trajectories missing: {', '.join(missing[:8])}"
                        + (" ..." if len(missing) > 8 else ""))
    return [read_json(p, "trajectory record") for p in paths]


def split_counts(records: list[dict], splits: tuple[str, ...], domains: list[str],
                 fields: tuple[str, ...] = ("samples",)) -> dict:
    """{split: {domain: {"trajectories": n, <field>: Σ record[field]}}} over part records."""
    counts = {s: {d: {"trajectories": 0, **{f: 0 for f in fields}} for d in domains} for s in splits}
    for record in records:
        c = counts[record["split"]][record["domain"]]
        c["trajectories"] += 1
        for f in fields:
            c[f] += record[f]
    return counts


def moments(records: list[dict]) -> dict:
    """Per-component mean and std from the records' `sum`, `sumsq` and `voxels` (population std)."""
    n = sum(r["voxels"] for r in records)
    mean = np.sum([r["sum"] for r in records], axis=0) / n
    var = np.sum([r["sumsq"] for r in records], axis=0) / n - mean**2
    return {"mean": mean.tolist(), "std": np.sqrt(np.maximum(var, 0)).tolist(), "voxels": n}
