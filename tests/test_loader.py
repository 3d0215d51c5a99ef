"""Latent shard streaming: mixing, rank split, fixed shapes, exact resume, integrity.

Synthetic latent shards of the exact contract form are built in-process. Every voxel of frame
`f` of trajectory `traj` in domain `d` holds the code d*10000 + traj*100 + f (before
normalization), so a batch item can be traced back to its shard and frame.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds

from shodh.data.loader import DataConfig, LatentStream, eval_batches, latent_dir, read_manifest
from shodh.errors import ConfigError, DataError
from shodh.io import AtomicShardWriter, sha256_file, write_json_atomic

TOK = "tok-aaaa"
C = 2
MEAN, STD = [1.0, -3.0], [2.0, 4.0]
DOMAINS = ["channel", "porous"]
FRAMES, WINDOW = 7, 4  # windows t0=0 (frames 0-3) and t0=3 (frames 3-6): 6 pairs per trajectory


def window_z(d: int, traj: int, t0: int, T: int) -> np.ndarray:
    codes_T = d * 10000 + traj * 100 + np.arange(t0, t0 + T)
    z_TCXYZ = np.broadcast_to(codes_T[:, None, None, None, None], (T, C, 16, 16, 16))
    return np.ascontiguousarray(z_TCXYZ, dtype=np.float32)


def make_latents(root: Path, counts: dict[str, dict[str, int]], tok: str = TOK) -> Path:
    """Write ROOT/latents/<tok>/<split>/<domain>-<traj>.tar and the manifest; counts[split][domain] shards."""
    base = latent_dir(root, tok)
    shards = []
    traj = 0
    for split, per_domain in counts.items():
        for d, domain in enumerate(DOMAINS):
            for _ in range(per_domain.get(domain, 0)):
                rel = f"{split}/{domain}-{traj:06d}.tar"
                with AtomicShardWriter(base / rel) as writer:
                    for t0 in range(0, FRAMES - 1, WINDOW - 1):
                        T = min(WINDOW, FRAMES - t0)
                        meta = {"domain": domain, "trajectory": traj, "t0": t0, "dt": 0.1,
                                "tokenizer_id": tok, "split": split}
                        writer.write(f"{domain}_{traj:05d}_{t0:05d}", {"z.npy": window_z(d, traj, t0, T), "meta.json": meta})
                shards.append({"path": rel, "split": split, "domain": domain, "trajectory": traj,
                               "samples": writer.count, "sha256": writer.sha256})
                traj += 1
    write_json_atomic(base / "manifest.json", {
        "tokenizer_id": tok, "channels": C, "window": WINDOW, "domains": DOMAINS, "shards": shards,
        "counts": {}, "stats": {"mean": MEAN, "std": STD},
    })
    return base


def decode_codes(z_BCXYZ: torch.Tensor) -> np.ndarray:
    """Per item code d*10000 + traj*100 + frame, undoing the normalization (checks every channel)."""
    raw_BC = z_BCXYZ[:, :, 0, 0, 0].numpy() * np.array(STD) + np.array(MEAN)
    assert np.allclose(raw_BC[:, 0], raw_BC[:, 1]), "channels normalized with the wrong stats"
    assert torch.equal(z_BCXYZ, z_BCXYZ[:, :, :1, :1, :1].expand_as(z_BCXYZ))
    return np.rint(raw_BC[:, 0]).astype(int)


def take(stream, n: int) -> list[dict]:
    it = iter(stream)
    out = [next(it) for _ in range(n)]
    it.close()  # shuts DataLoader workers down
    return out


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ws")
    # Unequal shard counts per domain: mixing must follow the weights, not the shard counts.
    make_latents(root, {"train": {"channel": 4, "porous": 2}, "val": {"channel": 2, "porous": 1}})
    return root


def cfg(**kw) -> DataConfig:
    base = dict(weights={"channel": 0.5, "porous": 0.5}, shuffle_buffer=96, workers=0, on_error="raise")
    return DataConfig(**{**base, **kw})


def stream(root, c=None, *, rank=0, world=1, batch=8, seed=3, split="train") -> LatentStream:
    return LatentStream(c or cfg(), root, TOK, split, batch, rank, world, seed)


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), k


@pytest.mark.parametrize("weights", [{"channel": 0.5, "porous": 0.5}, {"channel": 0.8, "porous": 0.2}])
def test_mixing_follows_weights_and_pairs_are_consecutive(root, weights):
    batches = take(stream(root, cfg(weights=weights)), 40)  # 320 items
    domain = torch.cat([b["domain"] for b in batches]).numpy()
    frac = np.bincount(domain, minlength=2) / len(domain)
    # Shard counts are 4:2, so a per-shard mix would give 0.67 channel; binomial sd is ~0.025.
    assert abs(frac[0] - weights["channel"]) < 0.06, frac
    for b in batches:
        code_in, code_out = decode_codes(b["z_in"]), decode_codes(b["z_out"])
        assert np.array_equal(code_out, code_in + 1)  # (z_t, z_{t+1}) of one trajectory
        assert np.array_equal(code_in // 10000, b["domain"].numpy())  # labels match the data
        assert b["z_in"].dtype == torch.float32 and b["domain"].dtype == torch.int64


def test_single_domain_weight_needs_no_other_domain(root):
    s = stream(root, cfg(weights={"porous": 1.0}))
    assert s.domains == DOMAINS
    assert all((b["domain"] == 1).all() for b in take(s, 5))


def test_two_ranks_read_disjoint_shards_with_equal_shapes(root):
    seen = []
    for rank in range(2):
        batches = take(stream(root, rank=rank, world=2), 30)
        assert {tuple(b["z_in"].shape) for b in batches} == {(8, C, 16, 16, 16)}
        codes = np.concatenate([decode_codes(b["z_in"]) for b in batches])
        seen.append(set(codes // 100))  # (domain, trajectory)
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {0, 1, 2, 3, 100 + 4, 100 + 5}  # every train shard, once


def test_too_few_shards_for_ranks_is_refused(root):
    with pytest.raises(DataError, match="porous.*rank 2 gets none"):
        stream(root, rank=2, world=3)


@pytest.mark.parametrize("world,batch", [(1, 4), (2, 4), (3, 5), (4, 8)])
def test_eval_pass_is_equal_on_every_rank_and_covers_the_split_once(root, world, batch):
    per_rank = [list(eval_batches(cfg(), root, TOK, "val", batch, r, world)) for r in range(world)]
    n_batches = {len(bs) for bs in per_rank}
    assert len(n_batches) == 1
    codes = []
    for bs in per_rank:
        for b in bs:
            assert tuple(b["z_in"].shape) == (batch, C, 16, 16, 16) and b["valid"].dtype == torch.bool
            assert np.array_equal(decode_codes(b["z_out"]), decode_codes(b["z_in"]) + 1)
            codes += list(decode_codes(b["z_in"])[b["valid"].numpy()])
    expected = sorted(d * 10000 + traj * 100 + f for d, traj in [(0, 6), (0, 7), (1, 8)] for f in range(FRAMES - 1))
    assert sorted(codes) == expected  # all 18 val pairs, each exactly once
    # Deterministic: a second pass is identical.
    assert_same(per_rank[0], list(eval_batches(cfg(), root, TOK, "val", batch, 0, world)))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_uninterrupted_stream(root, workers):
    c = cfg(workers=workers)
    full = take(stream(root, c), 14)
    first = stream(root, c)
    take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
    resumed = stream(root, c)
    resumed.load_state_dict(state)
    assert_same(take(resumed, 9), full[5:])
    # Resuming twice from the same in-memory stream continues, it does not restart.
    assert_same(take(resumed, 0) + take(first, 3), full[5:8])


def test_stream_does_not_depend_on_worker_count_and_resumes_across_it(root):
    ref = take(stream(root, cfg(workers=0)), 12)
    assert_same(take(stream(root, cfg(workers=2)), 12), ref)
    first = stream(root, cfg(workers=2))
    take(first, 7)
    resumed = stream(root, cfg(workers=1))
    resumed.load_state_dict(first.state_dict())
    assert_same(take(resumed, 5), ref[7:])


@pytest.mark.parametrize("workers", [0, 2])
def test_float16_batches_are_the_float32_ones_rounded(root, workers):
    """data.batch_dtype=float16: the same stream (positions, domains), z_in / z_out the float32 values rounded
    to float16, from workers (shared-memory hand-off) as in-process; a state resumes across the dtype."""
    ref = take(stream(root, cfg(workers=0)), 6)
    half = take(stream(root, cfg(workers=workers, batch_dtype="float16")), 6)
    for a, b in zip(half, ref, strict=True):
        assert a["z_in"].dtype == a["z_out"].dtype == torch.float16
        assert torch.equal(a["z_in"], b["z_in"].half()) and torch.equal(a["z_out"], b["z_out"].half())
        assert torch.equal(a["domain"], b["domain"])
    first = stream(root, cfg(workers=workers))
    take(first, 2)
    resumed = stream(root, cfg(workers=0, batch_dtype="float16"))
    resumed.load_state_dict(first.state_dict())
    assert torch.equal(take(resumed, 1)[0]["z_in"], ref[2]["z_in"].half())


@pytest.mark.parametrize("batch_dtype", ["float32", "float16"])
def test_shard_cache_reads_each_shard_once_and_changes_no_batch(root, monkeypatch, batch_dtype):
    """data.cache_mb: the resampling stream re-reads its 6 train shards many times without the cache, once
    with it; the batches are bit-identical (in-process and from workers); a budget below the rank's shards
    evicts (more reads, same batches)."""
    import shodh.data.loader as loader

    reads: list[str] = []
    real = loader.read_shard
    monkeypatch.setattr(loader, "read_shard", lambda url, *a: reads.append(url) or real(url, *a))
    counts = {}
    ref = None
    for cache_mb in (0, 1, 64):
        reads.clear()
        got = take(stream(root, cfg(cache_mb=cache_mb, batch_dtype=batch_dtype, shuffle_buffer=24)), 40)
        counts[cache_mb] = len(reads)
        if ref is None:
            ref = got
        assert_same(got, ref)
    shard_bytes = 2 * WINDOW * C * 16**3 * (2 if batch_dtype == "float16" else 4)  # two windows of 4 frames
    assert counts[64] == 6 < counts[0], counts
    if 2**20 // shard_bytes < 6:  # float32: 1 MiB holds 4 of the 6 shards
        assert 6 < counts[1] < counts[0], counts
    else:
        assert counts[1] == 6, counts
    assert_same(take(stream(root, cfg(workers=2, batch_dtype=batch_dtype, shuffle_buffer=24)), 40), ref)
    from shodh.config import load_config

    with pytest.raises(ConfigError, match="data.cache_mb: must be >= 0"):
        load_config("smoke", ["data.cache_mb=-1"])


def test_different_seed_gives_different_stream(root):
    a, b = take(stream(root, seed=1), 3), take(stream(root, seed=2), 3)
    assert not all(torch.equal(x["z_in"], y["z_in"]) for x, y in zip(a, b))


def test_resume_with_other_world_size_is_refused(root):
    state = stream(root, rank=0, world=2).state_dict()
    with pytest.raises(DataError, match="world_size=2.*world_size=1"):
        stream(root).load_state_dict(state)


def test_tokenizer_id_mismatch_names_both_ids(root):
    # The manifest under the wrong id's directory is the realistic case: copied or renamed latents.
    other = root / "latents" / "tok-bbbb"
    shutil.copytree(latent_dir(root, TOK), other, dirs_exist_ok=True)
    with pytest.raises(DataError, match=f"'{TOK}'.*'tok-bbbb'"):
        read_manifest(root, "tok-bbbb")
    with pytest.raises(DataError, match=f"'{TOK}'.*'tok-bbbb'"):
        LatentStream(cfg(), root, "tok-bbbb", "train", 4, 0, 1, 0)


def write_raw_shard(path: Path, samples: list[tuple[str, dict[str, bytes]]], record: bool = False) -> None:
    """Overwrite a shard with these samples; record=True also updates its manifest sha256 (a shard
    that was written bad, as opposed to one changed after it was written)."""
    with open(path, "wb") as f, wds.TarWriter(f, encoder=False) as writer:
        for key, members in samples:
            writer.write({"__key__": key, **members})
    if record:
        manifest_path = path.parents[1] / "manifest.json"  # <latent dir>/<split>/<shard>
        manifest = json.loads(manifest_path.read_text())
        for entry in manifest["shards"]:
            if manifest_path.parent / entry["path"] == path:
                entry["sha256"] = sha256_file(path)
        write_json_atomic(manifest_path, manifest)


def npy_bytes(array: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


def good_members(d: int, traj: int, t0: int) -> dict[str, bytes]:
    meta = {"domain": DOMAINS[d], "trajectory": traj, "t0": t0, "dt": 0.1, "tokenizer_id": TOK, "split": "train"}
    return {"z.npy": npy_bytes(window_z(d, traj, t0, WINDOW)), "meta.json": json.dumps(meta).encode()}


@pytest.fixture
def corrupt_root(tmp_path) -> Path:
    make_latents(tmp_path, {"train": {"channel": 2, "porous": 2}})
    return tmp_path


@pytest.mark.parametrize("bad", ["garbage", "object_array", "wrong_shape"])
def test_bad_npy_names_shard_and_key_or_is_skipped_and_counted(corrupt_root, bad):
    shard = latent_dir(corrupt_root, TOK) / "train/channel-000000.tar"
    z = {"garbage": b"\x93NUMPY not an array",
         "object_array": npy_bytes(np.array([{"x": 1}], dtype=object), allow_pickle=True),
         "wrong_shape": npy_bytes(np.zeros((WINDOW, C, 8, 8, 8), np.float32))}[bad]
    write_raw_shard(shard, [("channel_00000_00000", {**good_members(0, 0, 0), "z.npy": z}),
                            ("channel_00000_00003", good_members(0, 0, 3))], record=True)
    for workers in (0, 2):  # a worker process reports the same one-line error
        with pytest.raises(DataError, match=r"^[^\n]*channel-000000\.tar: sample 'channel_00000_00000'[^\n]*$"):
            take(stream(corrupt_root, cfg(weights={"channel": 1.0}, workers=workers), batch=4), 10)
    s = stream(corrupt_root, cfg(weights={"channel": 1.0}, on_error="skip"), batch=4)
    batches = take(s, 10)
    assert s.skipped >= 1
    codes = np.concatenate([decode_codes(b["z_in"]) for b in batches])
    assert not set(codes) & {0, 1, 2}  # the bad window's pairs never appear
    assert {3, 4, 5} <= set(codes)  # the good window of the same shard does
    # Eval refuses too, naming shard and key.
    with pytest.raises(DataError, match=r"channel-000000\.tar: sample 'channel_00000_00000'"):
        list(eval_batches(cfg(), corrupt_root, TOK, "train", 4, 0, 1))


def test_truncated_tar_names_shard_and_key_or_is_skipped_and_counted(corrupt_root):
    shard = latent_dir(corrupt_root, TOK) / "train/porous-000003.tar"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) * 2 // 3])  # cut inside the second sample's z.npy
    with pytest.raises(DataError, match=r"porous-000003\.tar: unreadable or truncated tar after sample 'porous_00003_00000'"):
        list(eval_batches(cfg(), corrupt_root, TOK, "train", 4, 0, 1))
    full = stream(corrupt_root, cfg(on_error="skip"), batch=4)
    take(full, 16)
    assert full.skipped >= 1
    for k in (3, 7, 12):  # the count survives a resume, without counting a re-read round twice
        first = stream(corrupt_root, cfg(on_error="skip"), batch=4)
        take(first, k)
        resumed = stream(corrupt_root, cfg(on_error="skip"), batch=4)
        resumed.load_state_dict(first.state_dict())
        assert resumed.skipped == first.skipped
        take(resumed, 16 - k)
        assert resumed.skipped == full.skipped, k


def test_tar_cut_at_a_member_boundary_is_caught_by_the_manifest_count(corrupt_root):
    shard = latent_dir(corrupt_root, TOK) / "train/channel-000000.tar"
    write_raw_shard(shard, [("channel_00000_00000", good_members(0, 0, 0))])  # manifest says 2 samples
    with pytest.raises(DataError, match=r"channel-000000\.tar: manifest lists 2 samples, read 1"):
        list(eval_batches(cfg(), corrupt_root, TOK, "train", 4, 0, 1))


def test_tokenizer_id_in_sample_meta_is_checked(corrupt_root):
    shard = latent_dir(corrupt_root, TOK) / "train/channel-000001.tar"
    members = good_members(0, 1, 0)
    members["meta.json"] = members["meta.json"].replace(TOK.encode(), b"tok-zzzz")
    write_raw_shard(shard, [("channel_00001_00000", members), ("channel_00001_00003", good_members(0, 1, 3))])
    with pytest.raises(DataError, match=r"channel_00001_00000.*'tok-zzzz'.*'tok-aaaa'"):
        list(eval_batches(cfg(), corrupt_root, TOK, "train", 4, 0, 1))


def test_shards_from_a_url_prefix(root, tmp_path):
    # Any WebDataset URL: here a `pipe:` command, as for object storage (`pipe:aws s3 cp ...`).
    c = cfg(urls=f"pipe:cat {latent_dir(root, TOK)}", allow_pipe=True)
    assert_same(take(stream(root, c), 3), take(stream(root), 3))
    assert_same(list(eval_batches(c, tmp_path, TOK, "val", 4, 0, 1)), list(eval_batches(cfg(), root, TOK, "val", 4, 0, 1)))


def test_config_section_and_validation():
    from shodh.config import load_config

    run = load_config("smoke", ["data.weights={channel: 0.8, porous: 0.2}", "data.workers=2"])
    assert run.data.weights == {"channel": 0.8, "porous": 0.2} and run.data.workers == 2
    with pytest.raises(ConfigError, match="data.workers: must be 0 or divide data.lanes=2, got 3"):
        load_config("smoke", ["data.workers=3"])
    with pytest.raises(ConfigError, match="data.on_error"):
        load_config("smoke", ["data.on_error=ignore"])
    with pytest.raises(ConfigError, match=r"data.weights.porous: must be >= 0"):
        load_config("smoke", ["data.weights={channel: 1.0, porous: -1.0}"])
