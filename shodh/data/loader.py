"""Latent shard streaming for pretraining and evaluation: domain mixing, rank splitting, exact resume.

Reads `ROOT/latents/<tokenizer-id>/<split>/<domain>-<traj>.tar` (or the same layout under any
WebDataset URL prefix, `data.urls`) and yields fixed-size batches of normalized latent pairs
(z_t, z_{t+1}) plus the domain id (metrics and routing telemetry only; never a model input).

Shape legend: B micro batch, T frames in a window, C latent channels, X Y Z latent grid (16^3).

Training stream (`LatentStream`), one per rank:
- Shards: each domain's shards of the split (manifest order) are dealt to ranks round robin,
  `shards[rank::world_size]`, so ranks read disjoint shards. A rank with no shard of a domain
  that has a positive weight is refused (write more trajectories or use fewer ranks).
- Lanes: a rank's stream is `data.lanes` independent sub-streams; batch b comes from lane
  b % lanes. DataLoader workers each serve a fixed subset of lanes (workers must divide
  lanes), so the batches do not depend on the number of workers, only on (seed, rank, lanes).
  Lanes resample from the rank's whole shard list with their own seeds (sampling with
  replacement needs no per-worker split; WebDataset's ResampledShards works the same way).
- Mixing: the domain of each item is drawn with the configured weights from an RNG keyed by
  (seed, rank, lane, batch index): a pure function of the position, independent of how many
  shards each domain has. Domains with weight 0 are never drawn and need no shards.
- Shuffling: per (lane, domain) the stream is a sequence of rounds; round q draws shards with
  replacement (RNG keyed by (seed, rank, lane, domain, q)) until it holds at least
  `shuffle_buffer / (lanes * active domains)` pairs, then emits a uniform permutation of them.
- Resume: the state is the number of batches delivered plus, per lane, its batch index and per
  domain (round, offset) — a few integers, carried inside each batch from the worker that made
  it, so prefetched but undelivered batches never count. Restoring re-reads only the current
  round of each (lane, domain), i.e. at most about `shuffle_buffer` pairs, never the history.
- World size: the shard split and RNG keys depend on (rank, world_size), so `load_state_dict`
  refuses a state saved with a different world size (or seed, lanes, batch size, split,
  tokenizer, weights) with an error naming both values. The number of workers may change.
  An elastic resume (shodh.train.reshard) maps the states with `remap_states`.

Why not WebDataset's `ResampledShards` / `shuffle` / `RandomMix` / `split_by_worker`: their RNG
and buffer state cannot be checkpointed (exact resume would mean replaying the whole stream
from step 0), and `split_by_worker` ties data to worker ids, which DataLoader's round robin
restarts at worker 0 after a resume. WebDataset still does the I/O: URL opening (`gopen`: local
paths, `http(s)://`, ...; `pipe:` only with data.allow_pipe, as it runs a shell command) and
tar-to-sample grouping (`tar_file_iterator`, `group_by_keys`) through `shodh.io.read_shard`, which
hashes the stream as it goes; samples are decoded by `shodh.io.decode_sample` (`allow_pickle=False`).

Shard cache (`data.cache_mb` per loader process): a shard read whole and clean is kept decoded, normalized
and in the batch dtype, so a resampled shard costs a dictionary lookup instead of tar, hash, np.load and
normalization again; batches are then stacked from memory. Which shard and pair come next never depends
on it (the RNG keys above do not change), so batches are bit-identical with the cache on or off; the
integrity checks ran when the shard was read, and the cache lives as long as its worker (in-process: its stream).

Integrity: every shard is read against its manifest entry, sha256 and sample count (checked when
the shard ends, before any of its samples is used: a shard is read whole before its pairs are
emitted) and each sample's meta (tokenizer id, split, domain, trajectory); non-finite latents
are refused. A manifest listing one (domain, trajectory) twice is refused when loaded.

Evaluation (`eval_batches`): one deterministic pass over the split in manifest order. Every
rank reads all shards of the split (val/test latents are small) and keeps pairs i with
i % world_size == rank; knowing the global count N lets every rank emit the same number of
equal batches, ceil(ceil(N / world_size) / B), padding with repeated items marked valid=False,
without any collective communication.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal
from urllib.parse import urlparse

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shodh.errors import ConfigError, DataError, check
from shodh.fields.normalization import LatentNorm
from shodh.io import ShardCheckError, check_manifest_shards, check_sample_meta, decode_sample, read_json, read_shard
from shodh.workspace import LATENT, latent_dir

log = logging.getLogger(__name__)

STATE_VERSION = 1
LATENT_REMEDY = "re-run `shodh encode` (it re-encodes shards that differ from their record)"
# Distinct RNG stream tags so the mixing and the shard/shuffle draws never share a stream.
_TAG_MIX, _TAG_ROUND = 1, 2


@dataclass
class DataConfig:
    """Config section `data`: how latent shards are streamed into pretraining and evaluation."""

    weights: dict[str, float] = field(default_factory=lambda: {"channel": 0.5, "porous": 0.5})
    shuffle_buffer: int = 256  # pairs held for shuffling per rank (split over lanes and domains)
    workers: int = 0  # DataLoader worker processes (0 = in-process); must divide `lanes`
    on_error: Literal["raise", "skip"] = "raise"
    urls: str = ""  # shard location override: local dir or WebDataset URL prefix (pipe:, http(s)://)
    # `pipe:` URLs run their text as a shell command (WebDataset's gopen), which would make a profile
    # code: refused unless allow_pipe is set, deliberately, for a profile you trust.
    allow_pipe: bool = False
    lanes: int = 4  # independent sub-streams per rank; fixes the data independently of `workers`
    prefetch: int = 2  # batches prefetched per worker
    # dtype of the training stream's z_in / z_out (normalized values): float16 halves what a worker hands the
    # training process through shared memory, the largest per-sample cost left in a worker
    # (benchmarks/bench_loader.py); it rounds them to 2^-11 relative, below bf16's 2^-8, so for bf16 training on GPU
    # it loses nothing. Evaluation batches stay float32.
    batch_dtype: Literal["float32", "float16"] = "float32"
    # MiB of decoded shards each loader process (a worker, or the training process with workers=0) keeps
    # (least recently used out first; 0 = off). The stream resamples shards with replacement, so once a
    # rank's shards fit, every batch after the first read of each shard is built from memory: no tar, hash,
    # np.load or normalization again (benchmarks/bench_loader.py). The batches are bit-identical either way.
    cache_mb: int = 2048

    def validate(self) -> None:
        check(len(self.weights) > 0, "weights", "needs at least one domain")
        for name, w in self.weights.items():
            check(w >= 0, f"weights.{name}", f"must be >= 0, got {w}")
        check(sum(self.weights.values()) > 0, "weights", f"must not all be 0, got {self.weights}")
        check(self.shuffle_buffer >= 1, "shuffle_buffer", f"must be >= 1, got {self.shuffle_buffer}")
        check(self.lanes >= 1, "lanes", f"must be >= 1, got {self.lanes}")
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(
            self.workers == 0 or self.lanes % self.workers == 0,
            "workers",
            f"must be 0 or divide data.lanes={self.lanes}, got {self.workers}",
        )
        check(self.prefetch >= 1, "prefetch", f"must be >= 1, got {self.prefetch}")
        check(self.cache_mb >= 0, "cache_mb", f"must be >= 0 (0 = off), got {self.cache_mb}")
        check(not _pipe_refused(self), "urls", _PIPE_REFUSED.format(self.urls))


_PIPE_REFUSED = ("{!r} runs a shell command (WebDataset pipe:); set data.allow_pipe=true to allow it, "
                 "only for a profile you trust")


def _pipe_refused(cfg: DataConfig) -> bool:
    return urlparse(cfg.urls.strip()).scheme == "pipe" and not cfg.allow_pipe


def _check_urls(cfg: DataConfig) -> None:
    """`validate`'s pipe: refusal, run again by every reader so a DataConfig built in code is held to it."""
    if _pipe_refused(cfg):
        raise ConfigError(f"data.urls: {_PIPE_REFUSED.format(cfg.urls)}")


def read_manifest(root: Path, tokenizer_id: str, urls: str = "") -> dict:
    """The latent manifest for `tokenizer_id`; refuses one written by another tokenizer.

    Read from `latent_dir(root, tokenizer_id)`, or from `<urls>/manifest.json` when a URL
    prefix is given (opened with WebDataset's gopen, so `pipe:` and `http(s)://` work).
    """
    if urls:
        where = f"{urls.rstrip('/')}/manifest.json"
        try:
            with wds.gopen(where) as stream:
                manifest = json.loads(stream.read())
        except (OSError, ValueError) as exc:
            raise DataError(f"{where}: latent manifest unreadable ({exc})") from None
    else:
        where = str(latent_dir(root, tokenizer_id) / "manifest.json")
        manifest = read_json(where, "latent manifest")
    found = manifest.get("tokenizer_id") if isinstance(manifest, dict) else None
    if found != tokenizer_id:
        raise DataError(
            f"{where}: latents were encoded by tokenizer '{found}' but the configured tokenizer is "
            f"'{tokenizer_id}'; re-run `shodh encode` or point at the matching tokenizer"
        )
    for key in ("channels", "domains", "shards", "stats"):
        if key not in manifest:
            raise DataError(f"{where}: latent manifest lacks '{key}'")
    check_manifest_shards(manifest["shards"], where, LATENT_REMEDY)
    if manifest.get("normalized", False):
        raise DataError(f"{where}: latents are marked normalized; the loader normalizes with stats itself")
    return manifest


@dataclass(frozen=True)
class _Shard:
    """One shard and its manifest entry, which every read is checked against."""

    url: str
    domain: str
    samples: int
    split: str
    trajectory: int
    sha256: str

    def entry(self) -> dict:
        return {"split": self.split, "domain": self.domain, "trajectory": self.trajectory}


@dataclass(frozen=True)
class _Source:
    """Everything a worker needs to read and check shards; small and picklable."""

    tokenizer_id: str
    channels: int
    domains: tuple[str, ...]
    norm: LatentNorm
    on_error: str

    def read(self, shard: _Shard) -> tuple[list[np.ndarray], int]:
        """Normalized windows z_TCXYZ (float32) of one shard, and how many samples were skipped."""
        samples, skipped = self.read_samples(shard)
        return [z for z, _ in samples], skipped

    def read_samples(self, shard: _Shard) -> tuple[list[tuple[np.ndarray, dict]], int]:
        """(normalized window z_TCXYZ float32, meta) of every sample of one shard, and how many were skipped.

        The shard is checked against its manifest entry while it streams (`shodh.io.read_shard`):
        sha256 and sample count once it ends, each sample's meta at once. Every problem raises a
        DataError naming the shard (and key), unless on_error="skip": then a bad sample is dropped
        and counted, and a shard that fails as a whole (unreadable tar, checksum or count differing
        from the manifest) contributes nothing and counts all its manifest samples as skipped.
        Nothing is returned before the whole shard verified.
        """
        windows: list[tuple[np.ndarray, dict]] = []
        skipped = 0
        try:
            for raw in read_shard(shard.url, shard.sha256, shard.samples, LATENT_REMEDY):
                try:
                    sample = decode_sample(raw, shard.url)
                    windows.append((self._window(sample, shard), sample["meta.json"]))
                except DataError:
                    if self.on_error == "raise":
                        raise
                    skipped += 1
        except ShardCheckError as exc:
            self._fail(str(exc))
            return [], max(1, shard.samples)
        return windows, skipped

    def _fail(self, message: str) -> None:
        if self.on_error == "raise":
            raise DataError(message)
        log.warning("skipping: %s", message)

    def _window(self, sample: dict, shard: _Shard) -> np.ndarray:
        key = sample["__key__"]
        where = f"{shard.url}: sample '{key}'"
        if "z.npy" not in sample or "meta.json" not in sample:
            members = sorted(k for k in sample if not k.startswith("__"))
            raise DataError(f"{where}: needs members z.npy and meta.json, has {members}")
        meta = sample["meta.json"]
        if not isinstance(meta, dict) or meta.get("tokenizer_id") != self.tokenizer_id:
            found = meta.get("tokenizer_id") if isinstance(meta, dict) else meta
            raise DataError(f"{where}: tokenizer_id '{found}' differs from the configured '{self.tokenizer_id}'")
        check_sample_meta(meta, shard.entry(), where, LATENT_REMEDY)
        z_TCXYZ = sample["z.npy"]
        expected = (self.channels, LATENT, LATENT, LATENT)
        if z_TCXYZ.ndim != 5 or z_TCXYZ.shape[1:] != expected or z_TCXYZ.shape[0] < 2:
            raise DataError(f"{where}: z.npy has shape {z_TCXYZ.shape}, expected [T>=2, {', '.join(map(str, expected))}]")
        if z_TCXYZ.dtype not in (np.float32, np.float16):
            raise DataError(f"{where}: z.npy has dtype {z_TCXYZ.dtype}, expected float32 or float16")
        # Float16 is widened by torch (vectorized; numpy's astype is ~5x slower), float32 stays the array
        # np.load just made for this reader; it is then checked (numpy's isfinite is the fast one here) and
        # normalized in place: every pass over a window costs loader rate (benchmarks/bench_loader.py).
        z_TCXYZ = torch.from_numpy(z_TCXYZ).to(torch.float32)
        if not np.isfinite(z_TCXYZ.numpy()).all():
            raise DataError(f"{where}: z.npy contains NaN or inf")
        return self.norm.normalize_(z_TCXYZ).numpy()


def _pairs(windows: list[np.ndarray]) -> list[tuple[int, int]]:
    """(window index, t) of every consecutive pair (z_t, z_{t+1}) in the windows, in order."""
    return [(w, t) for w, z_TCXYZ in enumerate(windows) for t in range(z_TCXYZ.shape[0] - 1)]


def _rng(*key: int) -> np.random.Generator:
    """A generator that is a pure function of its integer key (counter-based seeding)."""
    return np.random.default_rng(list(key))


def _as_dtype(z: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """`z` in `dtype`; torch rounds float32 -> float16 vectorized (numpy's cast is several times slower)."""
    return torch.from_numpy(z).to(dtype).numpy()


def _stacked(frames: list[np.ndarray], dtype: torch.dtype) -> torch.Tensor:
    """The frames (already of `dtype`) stacked into one tensor [B, ...]. In a DataLoader worker it is allocated in
    shared memory from the start: DataLoader would otherwise copy every batch into shared memory to send it."""
    out = torch.empty((len(frames), *frames[0].shape), dtype=dtype)
    if get_worker_info() is not None:
        out.share_memory_()
    np.stack(frames, out=out.numpy())
    return out


def _batch(windows_items: list[tuple[np.ndarray, int]], domain_B: np.ndarray, dtype: torch.dtype = torch.float32) -> dict:
    """Stack B items (window z_TCXYZ of `dtype`, t) into z_in / z_out [B, C, X, Y, Z] tensors."""
    return {
        "z_in": _stacked([z[t] for z, t in windows_items], dtype),
        "z_out": _stacked([z[t + 1] for z, t in windows_items], dtype),
        "domain": torch.as_tensor(domain_B, dtype=torch.int64),
    }


class _ShardCache:
    """One loader process's decoded shards: normalized windows in the batch dtype, least recently used out first.

    Only a shard read whole without a skipped sample is kept, so a hit returns exactly what a re-read would (and
    a transient failure under on_error="skip" is retried, not remembered). A shard larger than the budget is
    never kept. Per process: every DataLoader worker keeps its own.
    """

    def __init__(self, source: _Source, max_bytes: int, dtype: torch.dtype):
        self.source, self.max_bytes, self.dtype = source, max_bytes, dtype
        self._held: OrderedDict[str, list[np.ndarray]] = OrderedDict()
        self.bytes = 0

    def read(self, shard: _Shard) -> tuple[list[np.ndarray], int]:
        held = self._held.get(shard.url)
        if held is not None:
            self._held.move_to_end(shard.url)
            return held, 0
        windows, skipped = self.source.read(shard)
        windows = [_as_dtype(z, self.dtype) for z in windows]
        size = sum(z.nbytes for z in windows)
        if skipped == 0 and 0 < size <= self.max_bytes:
            while self.bytes + size > self.max_bytes:
                self.bytes -= sum(z.nbytes for z in self._held.popitem(last=False)[1])
            self._held[shard.url] = windows
            self.bytes += size
        return windows, skipped


@dataclass(frozen=True)
class _Plan:
    """The per-rank training stream's fixed parameters (picklable, sent to workers)."""

    source: _Source
    shards: tuple[tuple[_Shard, ...], ...]  # per domain (manifest order), this rank's shards
    probs: tuple[float, ...]  # per domain mixing probability (0 for inactive domains)
    seed: int
    rank: int
    lanes: int
    batch_size: int
    round_items: int  # pairs per shuffle round of one (lane, domain)
    batch_dtype: torch.dtype  # of z_in / z_out
    cache_bytes: int  # _ShardCache budget per loader process


class _Rounds:
    """One (lane, domain) item source: shuffled rounds of resampled shards; state (round, offset)."""

    def __init__(self, plan: _Plan, cache: _ShardCache, lane: int, d: int, round_: int, offset: int):
        self.plan, self.cache, self.lane, self.d = plan, cache, lane, d
        self.round, self.offset = round_, offset
        self.skipped = 0
        # Restored mid-round (offset > 0): the round's skips were counted before the save.
        self._recount = offset == 0
        self._items: list[tuple[np.ndarray, int]] | None = None

    def _load(self) -> None:
        plan = self.plan
        shards = plan.shards[self.d]
        rng = _rng(plan.seed, plan.rank, self.lane, self.d, self.round, _TAG_ROUND)
        windows: list[np.ndarray] = []
        n_pairs, draws = 0, 0
        while n_pairs < plan.round_items:
            draws += 1
            if n_pairs == 0 and draws > 4 * len(shards) + 8:
                raise DataError(
                    f"domain '{plan.source.domains[self.d]}': no readable pairs in {draws - 1} shard reads "
                    f"(every sample skipped?)"
                )
            got, skipped = self.cache.read(shards[int(rng.integers(len(shards)))])
            self.skipped += skipped if self._recount else 0
            windows += got
            n_pairs += sum(z.shape[0] - 1 for z in got)
        self._recount = True
        pairs = _pairs(windows)
        self._items = [(windows[pairs[i][0]], pairs[i][1]) for i in rng.permutation(len(pairs))]

    def take(self) -> tuple[np.ndarray, int]:
        if self._items is None:
            self._load()
        if self.offset >= len(self._items):
            self.round, self.offset, self._items = self.round + 1, 0, None
            return self.take()
        item = self._items[self.offset]
        self.offset += 1
        return item


class _Lane:
    """One sub-stream of fixed-size batches; batch j of the lane is a pure function of the plan."""

    def __init__(self, plan: _Plan, cache: _ShardCache, state: dict):
        self.plan, self.lane, self.batch = plan, state["lane"], state["batch"]
        self.skipped_before = state["skipped"]
        self.rounds = [_Rounds(plan, cache, self.lane, d, q, o) for d, (q, o) in enumerate(state["rounds"])]

    def state(self) -> dict:
        return {
            "lane": self.lane,
            "batch": self.batch,
            "rounds": [[r.round, r.offset] for r in self.rounds],
            "skipped": self.skipped_before + sum(r.skipped for r in self.rounds),
        }

    def next_batch(self) -> dict:
        plan = self.plan
        mix = _rng(plan.seed, plan.rank, self.lane, self.batch, _TAG_MIX)
        domain_B = mix.choice(len(plan.probs), size=plan.batch_size, p=plan.probs)
        items = [self.rounds[d].take() for d in domain_B]
        self.batch += 1
        out = _batch(items, domain_B, plan.batch_dtype)
        out["lane_state"] = self.state()
        return out


def _fresh_lane_state(lane: int, n_domains: int) -> dict:
    return {"lane": lane, "batch": 0, "rounds": [[0, 0] for _ in range(n_domains)], "skipped": 0}


class _LaneBatches(IterableDataset):
    """Batches start, start+1, ... of one rank; in a DataLoader, worker w makes start+w, start+w+W, ...

    DataLoader (in_order=True) returns batches from workers 0, 1, ..., W-1, 0, ... so the main
    process receives them in index order. Batch b comes from lane b % lanes; since W divides
    lanes, each worker always serves the same lanes and keeps their readers open.
    """

    def __init__(self, plan: _Plan, start: int, lane_states: list[dict], cache: _ShardCache | None = None):
        # cache: the in-process stream's own, kept across iterators; a worker makes its own (None here).
        self.plan, self.start, self.lane_states, self.cache = plan, start, lane_states, cache

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        lanes: dict[int, _Lane] = {}
        cache = self.cache or _ShardCache(self.plan.source, self.plan.cache_bytes, self.plan.batch_dtype)
        for b in itertools.count(self.start + worker, workers):
            lane_id = b % self.plan.lanes
            if lane_id not in lanes:
                lanes[lane_id] = _Lane(self.plan, cache, self.lane_states[lane_id])
            lane = lanes[lane_id]
            assert lane.batch == b // self.plan.lanes, "lane out of step with the batch index"
            try:
                batch = lane.next_batch()
            except DataError as exc:
                # Sent as data: DataLoader would re-raise it wrapped in a worker traceback,
                # and the CLI reports DataErrors as one line naming shard and key.
                yield {"data_error": str(exc)}
                return
            yield batch


def _source(manifest: dict, cfg: DataConfig, tokenizer_id: str) -> _Source:
    stats = manifest["stats"]
    channels = int(manifest["channels"])
    if len(stats.get("mean", [])) != channels or len(stats.get("std", [])) != channels:
        raise DataError(f"latent manifest: stats.mean/std must have {channels} entries (one per channel)")
    if any(s <= 0 for s in stats["std"]):
        raise DataError(f"latent manifest: stats.std must be > 0, got {stats['std']}")
    return _Source(
        tokenizer_id=tokenizer_id, channels=channels, domains=tuple(manifest["domains"]),
        norm=LatentNorm.from_stats(stats), on_error=cfg.on_error,
    )


def _split_shards(manifest: dict, cfg: DataConfig, root: Path, tokenizer_id: str, split: str) -> list[_Shard]:
    """The split's shards in manifest order, with URLs under `cfg.urls` or the local latent dir."""
    base = cfg.urls.rstrip("/") if cfg.urls else str(latent_dir(root, tokenizer_id))
    return [
        _Shard(url=f"{base}/{s['path']}", domain=s["domain"], samples=int(s["samples"]), split=s["split"],
               trajectory=s["trajectory"], sha256=s["sha256"])
        for s in manifest["shards"]
        if s["split"] == split
    ]


class LatentStream:
    """Infinite, resampled, mixed training stream of fixed-size batches for ONE rank.

    Yields {"z_in": [B, C, 16, 16, 16] (normalized z_t, float32 or data.batch_dtype), "z_out": same (z_{t+1}),
    "domain": int64 [B] (index into `domains`)}. One iterator at a time; a new `iter()` continues
    from the current state. See the module docstring for the sampling, resume and world-size rules.
    """

    def __init__(self, cfg: DataConfig, root: Path, tokenizer_id: str, split: str, batch_size: int,
                 rank: int, world_size: int, seed: int):
        if not 0 <= rank < world_size:
            raise DataError(f"rank {rank} is outside world size {world_size}")
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        self.cfg, self.split, self.tokenizer_id = cfg, split, tokenizer_id
        self.rank, self.world_size, self.seed, self.batch_size = rank, world_size, seed, batch_size
        _check_urls(cfg)
        manifest = read_manifest(root, tokenizer_id, cfg.urls)
        source = _source(manifest, cfg, tokenizer_id)
        self.domains: list[str] = list(source.domains)
        unknown = sorted(set(cfg.weights) - set(self.domains))
        if unknown:
            raise DataError(f"data.weights: domains {unknown} are not in the latent manifest (has {self.domains})")
        total = sum(cfg.weights.values())
        probs = tuple(cfg.weights.get(d, 0.0) / total for d in self.domains)
        shards = _split_shards(manifest, cfg, root, tokenizer_id, split)
        per_rank = []
        for d, name in enumerate(self.domains):
            mine = tuple(s for s in shards if s.domain == name)[rank::world_size]
            if probs[d] > 0 and not mine:
                n = sum(s.domain == name for s in shards)
                raise DataError(
                    f"split '{split}', domain '{name}': {n} shard(s) for {world_size} rank(s), rank {rank} "
                    f"gets none; every rank needs one (more trajectories, or fewer ranks)"
                )
            per_rank.append(mine)
        active = sum(p > 0 for p in probs)
        self._plan = _Plan(
            source=source, shards=tuple(per_rank), probs=probs, seed=seed, rank=rank, lanes=cfg.lanes,
            batch_size=batch_size, round_items=max(1, cfg.shuffle_buffer // (cfg.lanes * active)),
            batch_dtype=getattr(torch, cfg.batch_dtype), cache_bytes=cfg.cache_mb * 2**20,
        )
        self._batches = 0
        self._lane_states = [_fresh_lane_state(lane, len(self.domains)) for lane in range(cfg.lanes)]
        self._cache = _ShardCache(source, self._plan.cache_bytes, self._plan.batch_dtype)  # used when workers=0

    @property
    def skipped(self) -> int:
        """Samples skipped so far (on_error="skip"), over all lanes, including before a resume."""
        return sum(s["skipped"] for s in self._lane_states)

    def __iter__(self) -> Iterator[dict]:
        lane_states = [dict(s) for s in self._lane_states]
        if self.cfg.workers == 0:
            batches: Iterator[dict] = iter(_LaneBatches(self._plan, self._batches, lane_states, self._cache))
        else:
            workers = DataLoader(_LaneBatches(self._plan, self._batches, lane_states), batch_size=None,
                                 num_workers=self.cfg.workers, prefetch_factor=self.cfg.prefetch)
            batches = iter(workers)
        for batch in batches:
            if "data_error" in batch:
                raise DataError(batch["data_error"])
            state = batch.pop("lane_state")
            self._lane_states[state["lane"]] = state
            self._batches += 1
            yield batch

    def _identity(self) -> dict:
        """What the stream's content depends on; a state is only valid for the same identity."""
        return {
            "seed": self.seed, "rank": self.rank, "world_size": self.world_size, "lanes": self.cfg.lanes,
            "batch_size": self.batch_size, "split": self.split, "tokenizer_id": self.tokenizer_id,
            "domains": list(self.domains), "probs": list(self._plan.probs),
            "shuffle_buffer": self.cfg.shuffle_buffer,
        }

    def state_dict(self) -> dict:
        """Batches delivered so far plus per-lane positions; plain ints/strings (JSON-able)."""
        return {"version": STATE_VERSION, **self._identity(), "batches": self._batches,
                "lane_states": [dict(s, rounds=[list(r) for r in s["rounds"]]) for s in self._lane_states]}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` left off; refuses a state from a different stream.

        A different world size is refused, not re-split: the shard split and every RNG key
        depend on (rank, world_size), so no re-split could reproduce the uninterrupted stream.
        """
        if state.get("version") != STATE_VERSION:
            raise DataError(f"loader state version {state.get('version')!r}, expected {STATE_VERSION}")
        for key, mine in self._identity().items():
            if state.get(key) != mine:
                hint = (" (the per-rank shard split depends on it: resume with the same world size, "
                        "or start the data stream afresh)") if key == "world_size" else ""
                raise DataError(f"loader state was saved with {key}={state.get(key)!r}, this run has "
                                f"{key}={mine!r}{hint}")
        lane_states = state["lane_states"]
        if len(lane_states) != self.cfg.lanes or [s["lane"] for s in lane_states] != list(range(self.cfg.lanes)):
            raise DataError(f"loader state: lane_states must list lanes 0..{self.cfg.lanes - 1}")
        self._batches = int(state["batches"])
        self._lane_states = [dict(s, rounds=[list(r) for r in s["rounds"]]) for s in lane_states]


def remap_states(states: list, world_size: int) -> list:
    """Loader states for `world_size` ranks from the states of every old rank (elastic resume).

    The guarantee: with the same world size (only the expert-parallel layout changed) every rank
    keeps its state, so the data stream continues exactly as if uninterrupted. With another world
    size no old state describes a new rank's stream (shard split and RNG keys are functions of
    (rank, world_size)): every rank gets None and the trainer starts fresh streams keyed by
    seed + resume step, never a replay of step 0. The samples consumed so far are exact (step x
    the global batch, which the conversion keeps); the old ranks' unfinished shuffle rounds (at
    most data.shuffle_buffer pairs per rank) are not continued, and which windows come next differs
    from the uninterrupted run (the stream samples shards with replacement either way).
    """
    return list(states) if len(states) == world_size else [None] * world_size


def split_samples(cfg: DataConfig, root: Path, tokenizer_id: str, split: str) -> Iterator[tuple[np.ndarray, dict]]:
    """Every sample of `split` in manifest order, read with the training stream's checks (sha256 and
    count against the manifest; tokenizer id, split, domain, trajectory, shape, dtype, finite values
    per sample) and normalization: (z_TCXYZ float32, meta)."""
    _check_urls(cfg)
    manifest = read_manifest(root, tokenizer_id, cfg.urls)
    source = _source(manifest, cfg, tokenizer_id)
    for shard in _split_shards(manifest, cfg, root, tokenizer_id, split):
        yield from source.read_samples(shard)[0]


def eval_batches(cfg: DataConfig, root: Path, tokenizer_id: str, split: str, batch_size: int,
                 rank: int, world_size: int) -> Iterator[dict]:
    """One finite deterministic pass over `split` for one rank.

    Yields {"z_in", "z_out": float32 [B, C, 16, 16, 16], "domain": int64 [B], "valid": bool [B]}.
    Every rank yields the same number of batches of the same size B (DeepSpeed MoE's all-to-all
    needs equal token counts on every rank of an EP group); padding repeats an item with
    valid=False. Runs in-process (workers are for the training stream).
    """
    if not 0 <= rank < world_size:
        raise DataError(f"rank {rank} is outside world size {world_size}")
    _check_urls(cfg)
    manifest = read_manifest(root, tokenizer_id, cfg.urls)
    source = _source(manifest, cfg, tokenizer_id)
    domain_index = {name: d for d, name in enumerate(source.domains)}
    items: list[tuple[np.ndarray, int]] = []
    domains: list[int] = []
    valid: list[bool] = []
    n_pairs, skipped, emitted = 0, 0, 0
    first_global = first_mine = None  # padding repeats this rank's first pair, else the global first

    def flush() -> dict:
        batch = _batch(items[:batch_size], np.asarray(domains[:batch_size]))
        batch["valid"] = torch.as_tensor(valid[:batch_size], dtype=torch.bool)
        del items[:batch_size], domains[:batch_size], valid[:batch_size]
        return batch

    for shard in _split_shards(manifest, cfg, root, tokenizer_id, split):
        windows, lost = source.read(shard)
        skipped += lost
        for w, t in _pairs(windows):
            item = (windows[w], t, domain_index[shard.domain])
            first_global = first_global or item
            if n_pairs % world_size == rank:
                first_mine = first_mine or item
                items.append(item[:2])
                domains.append(item[2])
                valid.append(True)
                if len(items) == batch_size:
                    emitted += 1
                    yield flush()
            n_pairs += 1
    if skipped:
        log.warning("eval split '%s': skipped %d bad sample(s)", split, skipped)
    if n_pairs == 0:
        raise DataError(f"split '{split}': no pairs in the latent shards")
    pad = first_mine or first_global
    per_rank = -(-n_pairs // world_size)
    total = -(-per_rank // batch_size)
    while emitted < total:
        while len(items) < batch_size:
            items.append(pad[:2])
            domains.append(pad[2])
            valid.append(False)
        emitted += 1
        yield flush()
