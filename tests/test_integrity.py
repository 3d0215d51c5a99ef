"""Data integrity on read: nothing silently wrong between the shards on disk and what a stage uses.

Every stage that reads a raw or latent shard checks its sha256 (hashed while streaming) and
sample count against the manifest, each sample's split/domain/trajectory against the shard's
entry, and refuses a trajectory listed twice, non-finite latents, implausible raw fields,
`pipe:` URLs without data.allow_pipe, and clears a killed writer's temporaries.

Raw data is eval_workspace's synthetic 16^3 set (no solver) with a 2-step tokenizer; latents
are latent_fixture's synthetic set. Each test copies the workspace and damages its copy.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from eval_workspace import FAST, write_raw
from latent_fixture import TOKENIZER_ID, make_latents
from shodh import cli
from shodh.config import load_config
from shodh.data.loader import DataConfig, LatentStream, eval_batches, read_manifest, split_samples
from shodh.errors import ConfigError, DataError
from shodh.io import AtomicShardWriter, iter_shard, read_json, sha256_file, write_json_atomic
from shodh.tokenizer.data import load_raw_manifest, shards_of, stream_fields

ARGS = ["--profile", "smoke", *FAST, "tracking.mlflow=false", "tokenizer.threads=1"]
TRAIN = "train/channel-000000.tar"  # eval_workspace: channel trajectories 0 (train), 1 (val), 2 (test)
VAL = "val/channel-000001.tar"


# ---------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """Raw shards + manifest and a trained (2-step) tokenizer; copied, never modified."""
    root = tmp_path_factory.mktemp("integrity") / "ws"
    write_raw(root)
    assert cli.main(["train-tokenizer", "--root", str(root), *ARGS]) == 0
    return root


@pytest.fixture
def ws(tokenized, tmp_path) -> Path:
    root = tmp_path / "ws"
    shutil.copytree(tokenized / "raw", root / "raw")
    shutil.copytree(tokenized / "tokenizer", root / "tokenizer")
    return root


def rewrite(shard: Path, change, record: bool = False) -> None:
    """Rewrite a shard with `change(i, members) -> members | None` (None drops the sample);
    record=True also writes the new sha256 / count into the manifest beside the split folder
    (a shard written bad, rather than one changed after it was written)."""
    samples = [(s["__key__"], {k: v for k, v in s.items() if not k.startswith("__")}) for s in iter_shard(shard)]
    with AtomicShardWriter(shard) as writer:
        for i, (key, members) in enumerate(samples):
            members = change(i, members)
            if members is not None:
                writer.write(key, members)
    if record:
        set_entry(shard.parents[1], shard.relative_to(shard.parents[1]), sha256=writer.sha256, samples=writer.count)


def set_entry(folder: Path, rel: str | Path, **values) -> None:
    """Edit the manifest entry of shard `rel` in `folder`/manifest.json."""
    manifest = read_json(folder / "manifest.json")
    for entry in manifest["shards"]:
        if entry["path"] == str(rel):
            entry.update(values)
    write_json_atomic(folder / "manifest.json", manifest)


def entry(folder: Path, rel: str) -> dict:
    return next(e for e in read_json(folder / "manifest.json")["shards"] if e["path"] == rel)


def scale_last_frame(i: int, members: dict) -> dict:
    """A plausible, meta-consistent change: only the checksum can tell."""
    return {**members, "u.npy": members["u.npy"] * np.float32(1.5)} if i == 3 else members


def encode_error(root: Path, capsys) -> str:
    assert cli.main(["encode", "--root", str(root), *ARGS]) == 2
    return next(line for line in capsys.readouterr().err.splitlines() if line.startswith("shodh: error:"))


def latent_shards(root: Path) -> list[Path]:
    return sorted((root / "latents").rglob("*.tar"))


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# ---------------------------------------------------------------- raw shards: checksum, count, meta


def test_val_shard_copied_over_a_train_shard_is_refused_before_encoding(ws, capsys):
    raw = ws / "raw"
    shutil.copy(raw / VAL, raw / TRAIN)
    # The samples' own meta tells at once; with the manifest's checksum edited to match too.
    for _ in range(2):
        line = encode_error(ws, capsys)
        assert str(raw / TRAIN) in line and "split='val'" in line and "split='train'" in line
        assert "shodh simulate" in line
        assert not latent_shards(ws)  # the train shard is the first: nothing was written
        set_entry(raw, TRAIN, sha256=sha256_file(raw / TRAIN))


def test_changed_raw_shard_is_refused_by_its_checksum_before_encoding(ws, capsys):
    raw = ws / "raw"
    expected = entry(raw, TRAIN)["sha256"]
    rewrite(raw / TRAIN, scale_last_frame)  # plausible values, same meta: only the checksum can tell
    line = encode_error(ws, capsys)
    assert str(raw / TRAIN) in line and "checksum mismatch" in line and "shodh simulate" in line
    assert f"manifest sha256 {expected[:16]}, file {sha256_file(raw / TRAIN)[:16]}" in line
    assert not latent_shards(ws)


def test_all_zero_manifest_checksum_is_refused(ws, capsys):
    set_entry(ws / "raw", TRAIN, sha256="0" * 64)
    line = encode_error(ws, capsys)
    assert str(ws / "raw" / TRAIN) in line and "manifest sha256 0000000000000000" in line


def test_raw_shard_missing_its_last_frame_is_refused(ws, capsys):
    rewrite(ws / "raw" / TRAIN, lambda i, m: None if i == 3 else m)
    line = encode_error(ws, capsys)
    assert str(ws / "raw" / TRAIN) in line and "manifest lists 4 samples, read 3" in line
    assert not latent_shards(ws)


def _stream(root: Path) -> None:
    manifest = load_raw_manifest(root, 16)
    stream = stream_fields(shards_of(manifest, root, "train"), seed=0, buffer=1)
    for _ in range(100):  # two train shards of 4 frames: every shard is read within 100 fields
        next(stream)


def _heldout(root: Path) -> None:
    from shodh.fields.normalization import Normalization
    from shodh.tokenizer.model import build_net
    from shodh.tokenizer.train import evaluate

    manifest = load_raw_manifest(root, 16)
    net = build_net(load_config("smoke", FAST).tokenizer.architecture(), 16)
    # max_fields=1 uses one frame, and still reads its shard to the end to verify it
    evaluate(net, Normalization.from_raw_stats(manifest["stats"]), manifest, root, "val", 1, torch.device("cpu"))


def _audit(root: Path) -> None:
    from shodh.tokenizer.audit import real_fields

    real_fields(load_raw_manifest(root, 16), root, 16)  # the first frame of val/channel-000001


def _evaluate(root: Path) -> None:
    from shodh.eval.evaluate import _raw_frames

    _raw_frames(load_raw_manifest(root, 16), root, "val", "channel", 1)


@pytest.mark.parametrize("reader", [_stream, _heldout, _audit, _evaluate])
def test_every_raw_reader_verifies_the_checksum(ws, reader):
    shard = TRAIN if reader is _stream else VAL
    reader(ws)  # intact: reads fine
    rewrite(ws / "raw" / shard, scale_last_frame)
    with pytest.raises(DataError, match=rf"{shard}: checksum mismatch, manifest sha256 [0-9a-f]{{16}}, file [0-9a-f]{{16}}"):
        reader(ws)


def test_trajectory_listed_in_two_splits_is_refused(ws, tmp_path):
    raw = ws / "raw"
    set_entry(raw, VAL, trajectory=0)  # channel trajectory 0 is also the train shard
    with pytest.raises(DataError, match=rf"channel trajectory 0 is listed twice, as {TRAIN} and {VAL}"):
        load_raw_manifest(ws, 16)
    make_latents(tmp_path)
    latents = tmp_path / "latents" / TOKENIZER_ID
    set_entry(latents, "val/porous-000002.tar", trajectory=0)
    with pytest.raises(DataError, match="porous trajectory 0 is listed twice, as train/porous-000000.tar and "
                                        "val/porous-000002.tar"):
        read_manifest(tmp_path, TOKENIZER_ID)


# ---------------------------------------------------------------- raw values: dtype, magnitude, mask


@pytest.mark.parametrize("bad, needle", [
    (lambda m: {**m, "u.npy": m["u.npy"].astype(np.float16)}, "u.npy has dtype float16, expected float32 or float64"),
    (lambda m: {**m, "u.npy": np.rint(m["u.npy"]).astype(np.int64)}, "u.npy has dtype int64"),
    (lambda m: {**m, "u.npy": m["u.npy"] * np.float32(1e30)}, "e+29, above the plausible"),
    (lambda m: {**m, "mask.npy": m["mask.npy"] * np.uint8(2)}, "mask.npy holds 2, expected only 0 and 1"),
    (lambda m: {**m, "mask.npy": m["mask.npy"].astype(np.float32)}, "mask.npy has dtype float32"),
])
def test_implausible_raw_frames_are_refused(ws, capsys, bad, needle):
    # porous: its mask has solid cells; re-recorded, so only the value checks can object
    rewrite(ws / "raw" / "train/porous-000000.tar", lambda i, m: bad(m) if i == 2 else m, record=True)
    line = encode_error(ws, capsys)
    assert "train/porous-000000.tar: sample 'porous_00000_00002'" in line and needle in line, line


def test_plausibility_bound_follows_the_train_statistics(ws):
    from shodh.tokenizer.data import raw_frames

    manifest = load_raw_manifest(ws, 16)
    stats = manifest["stats"]["channel"]
    limit = next(s["limit"] for s in shards_of(manifest, ws, "train") if s["domain"] == "channel")
    assert limit == pytest.approx(1e3 * max(abs(m) + s for m, s in zip(stats["mean"], stats["std"])))
    peak = max(float(np.abs(u).max()) for u, _, _ in raw_frames(shards_of(manifest, ws, "train")[0]))
    assert peak < limit / 100  # real fields sit far inside the bound


# ---------------------------------------------------------------- non-finite latents


def test_tokenizer_producing_inf_writes_no_latents(ws, capsys, monkeypatch):
    from shodh.tokenizer import model

    real = model.Tokenizer.encode

    def broken(self, u, mask, domain):
        z = real(self, u, mask, domain)
        z[0, 0, 0, 0, 0] = float("inf")  # the first frame of each encode batch
        return z

    monkeypatch.setattr(model.Tokenizer, "encode", broken)
    line = encode_error(ws, capsys)
    assert str(ws / "raw" / TRAIN) in line and "frame 0 " in line and "NaN/inf" in line
    assert not latent_shards(ws)


def _poison(root: Path, rel: str, value: float) -> None:
    def change(i: int, m: dict) -> dict:
        if i == 0:
            z = m["z.npy"].copy()
            z[1, 2, 3, 4, 5] = value
            m = {**m, "z.npy": z}
        return m

    rewrite(root / "latents" / TOKENIZER_ID / rel, change, record=True)


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_non_finite_latents_are_refused_or_skipped(tmp_path, value):
    make_latents(tmp_path)
    _poison(tmp_path, "train/channel-000000.tar", value)
    with pytest.raises(DataError, match=r"train/channel-000000\.tar: sample 'channel_00000_00000'.*NaN or inf"):
        list(eval_batches(DataConfig(), tmp_path, TOKENIZER_ID, "train", 4, 0, 1))
    with pytest.raises(DataError, match="NaN or inf"):
        next(iter(LatentStream(DataConfig(weights={"channel": 1.0}), tmp_path, TOKENIZER_ID, "train", 4, 0, 1, 0)))
    stream = LatentStream(DataConfig(weights={"channel": 1.0}, on_error="skip", lanes=1, shuffle_buffer=8),
                          tmp_path, TOKENIZER_ID, "train", 4, 0, 1, 0)
    batches = [b for _, b in zip(range(6), stream)]
    assert stream.skipped >= 1 and all(torch.isfinite(b["z_in"]).all() and torch.isfinite(b["z_out"]).all()
                                       for b in batches)


# ---------------------------------------------------------------- latent shards: checksum, meta


def test_changed_latent_shard_is_refused_by_its_checksum_or_skipped(tmp_path, caplog):
    make_latents(tmp_path)
    latents = tmp_path / "latents" / TOKENIZER_ID
    train = latents / "train/channel-000000.tar"
    expected = entry(latents, "train/channel-000000.tar")["sha256"]
    rewrite(train, lambda i, m: {**m, "z.npy": m["z.npy"] * np.float32(1.5)} if i == 1 else m)
    pattern = (rf"{train}: checksum mismatch, manifest sha256 {expected[:16]}, file {sha256_file(train)[:16]} .*"
               r"re-run `shodh encode`")
    with pytest.raises(DataError, match=pattern):
        list(eval_batches(DataConfig(), tmp_path, TOKENIZER_ID, "train", 4, 0, 1))
    with pytest.raises(DataError, match=pattern):
        list(split_samples(DataConfig(), tmp_path, TOKENIZER_ID, "train"))
    remote = DataConfig(urls=f"pipe:cat {latents}", allow_pipe=True)  # a stream, hashed the same way
    with pytest.raises(DataError, match=f"pipe:cat {pattern}"):
        list(eval_batches(remote, tmp_path, TOKENIZER_ID, "train", 4, 0, 1))
    cfg = DataConfig(weights={"channel": 1.0}, lanes=1, shuffle_buffer=8)
    with pytest.raises(DataError, match=pattern):
        for _ in zip(range(20), LatentStream(cfg, tmp_path, TOKENIZER_ID, "train", 4, 0, 1, 0)):
            pass
    # on_error=skip: the whole shard counts as skipped, with a warning; the intact shard carries on
    skip = LatentStream(DataConfig(weights={"channel": 1.0}, lanes=1, shuffle_buffer=8, on_error="skip"),
                        tmp_path, TOKENIZER_ID, "train", 4, 0, 1, 0)
    with caplog.at_level("WARNING"):
        batches = [b for _, b in zip(range(10), skip)]
    assert len(batches) == 10 and skip.skipped >= 2 and "checksum mismatch" in caplog.text


def test_latent_val_shard_copied_over_a_train_shard_is_refused(tmp_path):
    make_latents(tmp_path)
    latents = tmp_path / "latents" / TOKENIZER_ID
    train = latents / "train/channel-000000.tar"
    shutil.copy(latents / "val/channel-000002.tar", train)
    pattern = r"channel-000000\.tar: sample 'channel_00002_00000'.*split='val'.*split='train'"
    # The samples' own meta tells at once; with the manifest's checksum edited to match too.
    for _ in range(2):
        with pytest.raises(DataError, match=pattern):
            list(eval_batches(DataConfig(), tmp_path, TOKENIZER_ID, "train", 4, 0, 1))
        with pytest.raises(DataError, match=pattern):
            next(iter(LatentStream(DataConfig(weights={"channel": 1.0}), tmp_path, TOKENIZER_ID, "train", 4, 0, 1, 0)))
        set_entry(latents, "train/channel-000000.tar", sha256=sha256_file(train))


# ---------------------------------------------------------------- pipe: URLs


def test_pipe_urls_need_allow_pipe(tmp_path):
    with pytest.raises(ConfigError, match=r"^data\.urls: 'pipe:cat /x'.*data\.allow_pipe"):
        load_config("smoke", ["data.urls=pipe:cat /x"])
    assert load_config("smoke", ["data.urls=pipe:cat /x", "data.allow_pipe=true"]).data.allow_pipe
    make_latents(tmp_path)
    marker = tmp_path / "ran"
    cfg = DataConfig(urls=f"pipe:touch {marker}; cat {tmp_path / 'latents' / TOKENIZER_ID}")
    for read in (lambda: LatentStream(cfg, tmp_path, TOKENIZER_ID, "train", 4, 0, 1, 0),
                 lambda: list(eval_batches(cfg, tmp_path, TOKENIZER_ID, "val", 4, 0, 1)),
                 lambda: list(split_samples(cfg, tmp_path, TOKENIZER_ID, "val"))):
        with pytest.raises(ConfigError, match=r"data\.urls.*data\.allow_pipe"):
            read()
    assert not marker.exists()  # no command ran


# ---------------------------------------------------------------- debris of killed writers


def _debris(folder: Path, names: list[str], live: int) -> tuple[list[Path], list[Path]]:
    dead = dead_pid()
    stale = [folder / f"{name}.tmp-{dead}" for name in names]
    alive = [folder / f"{names[0]}.tmp-{live}"]
    for path in stale + alive:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"half a shard")
    return stale, alive


def test_simulate_start_removes_temporaries_of_dead_writers(tmp_path, monkeypatch, caplog):
    from shodh.physics import simulate

    cfg = load_config("smoke", ["sim.domains=[porous]", "sim.trajectories.train=1", "sim.trajectories.val=0",
                                "sim.trajectories.test=0"]).sim
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        raw = tmp_path / "raw"
        stale, alive = _debris(raw, ["train/porous-000000.tar", "parts/porous-000000.json", "manifest.json"],
                               sleeper.pid)

        def stop(*args, **kwargs):
            raise RuntimeError("stop after the start")

        monkeypatch.setattr(simulate, "generate_trajectory", stop)
        with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="stop after the start"):
            simulate.run(cfg, 0, tmp_path)
        assert not any(p.exists() for p in stale) and all(p.exists() for p in alive)
        assert str(stale[0]) in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait()


def test_encode_start_removes_temporaries_of_dead_writers(ws, monkeypatch, caplog):
    from shodh.tokenizer import encode

    tok_id = read_json(ws / "tokenizer" / "tokenizer.json")["id"]
    out = ws / "latents" / tok_id
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        stale, alive = _debris(out, [TRAIN, "parts/channel-000000.json", "manifest.json"], sleeper.pid)

        def stop(*args, **kwargs):
            raise RuntimeError("stop after the start")

        monkeypatch.setattr(encode, "encode_trajectory", stop)
        with caplog.at_level("WARNING"), pytest.raises(RuntimeError, match="stop after the start"):
            cli.main(["encode", "--root", str(ws), *ARGS])
        assert not any(p.exists() for p in stale) and all(p.exists() for p in alive)
        assert str(stale[0]) in caplog.text
    finally:
        sleeper.kill()
        sleeper.wait()

