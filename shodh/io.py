"""Leaf I/O shared by every stage: atomic writes, JSON, hashing, pickle-free WebDataset shard reading.

A shard is a plain tar of samples; a sample is a key plus members `<key>.<name>` (`u.npy`,
`meta.json`, ...). Writers stream into `<name>.tmp-<pid>` and rename on completion, so a
crash never leaves a half-written shard under the final name. Readers decode `.npy` with
`allow_pickle=False` and `.json` as JSON only, and name the shard and key in every error.
Stages read shards against their manifest entry (`read_shard`, `iter_shard` with an entry):
sha256 hashed while streaming, sample count, and each sample's split/domain/trajectory.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import tarfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping
from urllib.parse import urlparse

import numpy as np
import webdataset as wds
from webdataset.tariterators import group_by_keys, tar_file_iterator

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


# ---------------------------------------------------------------- verified shard reading
# Every stage that reads a shard checks it against its manifest entry in the same pass: the bytes
# are hashed while webdataset's tar iterator consumes them, so verification costs no extra read.

SHA256_HEX = 64


class ShardCheckError(DataError):
    """A shard as a whole is bad: unreadable tar, or its bytes or sample count differ from its
    manifest entry. None of its samples can be trusted (per-sample problems are plain DataErrors)."""


class HashingReader:
    """Read-only file-like wrapper that feeds every byte read through it into sha256."""

    def __init__(self, stream: Any, name: str):
        self._stream, self._name = stream, name
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self._digest.update(data)
        return data

    def hexdigest_to_end(self) -> str:
        """Read what the tar reader left (end-of-archive blocks, record padding); the whole stream's sha256."""
        while self.read(1 << 20):
            pass
        return self._digest.hexdigest()

    def __repr__(self) -> str:  # webdataset appends its file object to error messages
        return self._name


def _open_shard(url: str) -> Any:
    """A local path is opened directly, anything with a scheme (`pipe:`, `https://`) through gopen."""
    if not urlparse(url).scheme:
        try:
            return open(url, "rb")
        except FileNotFoundError:
            raise DataError(f"{url}: shard not found") from None
        except OSError as exc:
            raise DataError(f"{url}: cannot open shard ({exc.strerror or exc})") from None
    try:
        return wds.gopen(url)
    except (OSError, ValueError) as exc:
        raise DataError(f"{url}: cannot open shard ({exc})") from None


def read_shard(url: str | Path, sha256: str | None = None, samples: int | None = None,
               remedy: str = "") -> Iterator[dict]:
    """Undecoded samples ({"__key__", "__url__", member: bytes}) of one shard, in order.

    Hashes the stream while reading it. With `sha256` / `samples` (the shard's manifest entry),
    once the last sample is out the rest of the stream is read and the sample count, then the
    digest, are compared: a mismatch raises ShardCheckError naming the shard, both figures and
    `remedy`. The check can only fire after the last sample, so a caller must read the shard to
    its end before acting irreversibly on it. An unreadable or truncated tar raises
    ShardCheckError naming the last good key.
    """
    url = str(url)
    stream = _open_shard(url)
    reader = HashingReader(stream, url)
    count, last_key = 0, None
    try:
        try:
            files = ({**f, "__url__": url} for f in tar_file_iterator(reader, handler=wds.reraise_exception))
            for sample in group_by_keys(files, handler=wds.reraise_exception):
                count, last_key = count + 1, sample["__key__"]
                yield sample
            found = reader.hexdigest_to_end()
            stream.close()  # a `pipe:` reports its command's exit status here
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            where = f"after sample '{last_key}'" if last_key else "before the first sample"
            raise ShardCheckError(f"{url}: unreadable or truncated tar {where} ({type(exc).__name__}: {exc})"
                                  + (f"; {remedy}" if remedy else "")) from None
    finally:
        try:
            stream.close()
        except OSError:
            pass  # already failed or already closed: the error that matters is propagating
    if samples is not None and count != samples:
        # A tar cut at a member boundary reads cleanly; only the manifest count shows it.
        raise ShardCheckError(f"{url}: manifest lists {samples} samples, read {count} (last key '{last_key}'; "
                              f"truncated shard?)" + (f"; {remedy}" if remedy else ""))
    if sha256 is not None and found != sha256:
        raise ShardCheckError(f"{url}: checksum mismatch, manifest sha256 {str(sha256)[:16]}, file {found[:16]} "
                              f"(the shard changed after it was written)" + (f"; {remedy}" if remedy else ""))


def check_sample_meta(meta: Any, entry: Mapping[str, Any], where: str, remedy: str = "") -> None:
    """A sample's own meta.json must agree with its shard's manifest entry on split, domain and
    trajectory: this catches a shard copied over another even when its manifest checksum was
    edited to match (a held-out trajectory silently becoming training data)."""
    if not isinstance(meta, dict):
        raise DataError(f"{where}: meta.json must be an object with split, domain and trajectory, got {meta!r}")
    for key in ("split", "domain", "trajectory"):
        if key in entry and meta.get(key) != entry[key]:
            raise DataError(f"{where}: meta.json has {key}={meta.get(key)!r} but the manifest lists the shard with "
                            f"{key}={entry[key]!r} (a shard copied from another trajectory or split?)"
                            + (f"; {remedy}" if remedy else ""))


def iter_shard(path: str | Path, entry: Mapping[str, Any] | None = None, remedy: str = "") -> Iterator[dict]:
    """Decoded samples of one shard, in order; errors name the shard and the key.

    With `entry` (its manifest record: sha256, samples, split, domain, trajectory) every sample's
    meta is checked against it and the shard's count and checksum after the last sample
    (`read_shard`): read to the end before trusting what was read.
    """
    shard = str(path)
    sha, count = (entry["sha256"], int(entry["samples"])) if entry is not None else (None, None)
    for raw in read_shard(shard, sha, count, remedy):
        sample = decode_sample(raw, shard)
        if entry is not None:
            if "meta.json" not in sample:
                raise DataError(f"{shard}: sample '{sample['__key__']}' has no member 'meta.json'")
            check_sample_meta(sample["meta.json"], entry, f"{shard}: sample '{sample['__key__']}'", remedy)
        yield sample


def check_manifest_shards(shards: Any, where: str, remedy: str = "") -> None:
    """The `shards` list of a raw or latent manifest: every entry complete, paths distinct, and each
    (domain, trajectory) listed once, so no trajectory sits in two splits; errors name `where`."""
    if not isinstance(shards, list):
        raise DataError(f"{where}: 'shards' must be a list")
    seen: dict[tuple[str, int], str] = {}
    paths: set[str] = set()
    for i, entry in enumerate(shards):
        if not isinstance(entry, dict):
            raise DataError(f"{where}: shards[{i}] is not an object")
        for key in ("path", "split", "domain", "trajectory", "samples", "sha256"):
            if key not in entry:
                raise DataError(f"{where}: shards[{i}] ({entry.get('path', '?')}) lacks '{key}'")
        sha = entry["sha256"]
        if not (isinstance(sha, str) and len(sha) == SHA256_HEX and all(c in "0123456789abcdef" for c in sha)):
            raise DataError(f"{where}: shards[{i}] ({entry['path']}) has sha256 {sha!r}, not 64 hex digits")
        if not isinstance(entry["samples"], int) or entry["samples"] < 0:
            raise DataError(f"{where}: shards[{i}] ({entry['path']}) has samples {entry['samples']!r}, not a count")
        if entry["path"] in paths:
            raise DataError(f"{where}: shard {entry['path']} is listed twice")
        paths.add(entry["path"])
        key = (entry["domain"], entry["trajectory"])
        if key in seen:
            raise DataError(f"{where}: {key[0]} trajectory {key[1]} is listed twice, as {seen[key]} and {entry['path']}; "
                            f"a trajectory belongs to exactly one split" + (f" ({remedy})" if remedy else ""))
        seen[key] = entry["path"]


# ---------------------------------------------------------------- temporaries of dead writers


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temporaries(paths: list[Path]) -> list[Path]:
    """Remove `<path>.tmp-<pid>` files beside each of `paths` whose writer `pid` is no longer running
    (a killed writer's debris; see AtomicShardWriter / write_atomic); returns what was removed.

    Callers pass only files they alone may write (their share of trajectories, under their run
    lock): a pid is only meaningful on its own host, and another host's live writer must not lose
    its temporary because its pid is free here.
    """
    import logging

    removed = []
    for path in paths:
        path = Path(path)
        if not path.parent.is_dir():
            continue
        for tmp in path.parent.glob(f"{glob.escape(path.name)}.tmp-*"):
            pid = tmp.name.rsplit(".tmp-", 1)[1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_running(int(pid)):
                tmp.unlink(missing_ok=True)
                removed.append(tmp)
                logging.getLogger(__name__).warning("removed %s, left by process %s that is gone", tmp, pid)
    return removed


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


def fold_sections(manifest: dict, sections: list[dict]) -> dict:
    """The raw manifest with imported domains' sections (shodh import) added: their domains,
    shards, counts and train statistics; `imported` lists them. A domain in two sections, or one
    the manifest already has, is an error: a domain has one source."""
    out = {**manifest, "domains": list(manifest["domains"]), "shards": list(manifest["shards"]),
           "counts": {s: dict(c) for s, c in manifest["counts"].items()}, "stats": dict(manifest["stats"]),
           "imported": []}
    for section in sections:
        domain = section["domain"]
        if domain in out["domains"]:
            raise DataError(f"raw manifest: domain '{domain}' comes from two sources (simulated or imported twice); "
                            f"import it under another --domain")
        if section["grid"] != out["grid"]:
            raise DataError(f"raw manifest: imported domain '{domain}' has grid {section['grid']}, the workspace "
                            f"{out['grid']}; re-import it with --resample {out['grid']}")
        out["domains"].append(domain)
        out["imported"].append(domain)
        out["shards"] += section["shards"]
        for split, count in section["counts"].items():
            out["counts"].setdefault(split, {})[domain] = count
        out["stats"][domain] = section["stats"]
    return out


# ---------------------------------------------------------------- run locks


class RunLock:
    """Exclusive lock on one output (a run directory, raw data, a tokenizer, a latent set) for the
    life of a process, so two processes never write the same files.

    `fcntl.flock` on the lock file: the kernel releases it when the holder exits or dies, so a dead
    process never blocks the next one; its record (pid, host, command, time) is then still in the
    file, and the new holder reports it as a stale lock it took over. A live holder makes the
    second process fail at once with a one-line error naming it. Local filesystems only: flock on
    network filesystems is advisory at best (one writer per run directory is then the user's job).
    """

    def __init__(self, path: str | Path, what: str):
        self.path, self.what = Path(path), what
        self._file = None

    def _record(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def __enter__(self) -> "RunLock":
        import fcntl
        import logging
        import socket
        import sys
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a+")
        try:
            fcntl.flock(self._file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._file.close()
            holder = self._record()
            raise DataError(f"{self.path.parent}: {self.what} is in use by pid {holder.get('pid', '?')} on "
                            f"{holder.get('host', '?')} since {holder.get('since', '?')} "
                            f"({holder.get('command', '?')}); wait for it to finish or stop it") from None
        stale = self._record()
        if stale.get("pid"):
            logging.getLogger(__name__).warning(
                "%s: stale lock of pid %s on %s (since %s) taken over; that process is gone",
                self.path, stale["pid"], stale.get("host", "?"), stale.get("since", "?"))
        self._file.seek(0)
        self._file.truncate()
        self._file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                     "since": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}))
        self._file.flush()
        return self

    def __exit__(self, *exc) -> None:
        import fcntl

        # Empty the record first: a record without a live lock means "crashed", an empty one "finished".
        self._file.seek(0)
        self._file.truncate()
        self._file.flush()
        fcntl.flock(self._file, fcntl.LOCK_UN)
        self._file.close()
