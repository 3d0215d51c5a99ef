"""The simulate stage end to end through the CLI: shard layout, manifest, resume, refusal, errors."""

import json
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from shodh.config import load_config
from shodh.fields.spectral import divergence_stats
from shodh.io import iter_shard, sha256_file
from shodh.physics import simulate
from shodh.workspace import SPLITS

REPO = Path(__file__).resolve().parents[1]


def shodh(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "shodh", *args], capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"shodh {' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def smoke_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("smoke")
    shodh("simulate", "--profile", "smoke", "--root", str(root))
    return root


def test_layout_keys_shapes_and_manifest(smoke_root):
    raw = smoke_root / "raw"
    manifest = json.loads((raw / "manifest.json").read_text())
    cfg = load_config("smoke").sim
    n = cfg.grid
    assert manifest["grid"] == n and manifest["domains"] == ["channel", "porous"]
    trajectories = {}
    for entry in manifest["shards"]:
        path = raw / entry["path"]
        assert path.name == f"{entry['domain']}-{entry['trajectory']:06d}.tar"
        assert path.parent.name == entry["split"]
        assert sha256_file(path) == entry["sha256"]
        trajectories.setdefault(entry["domain"], {})[entry["trajectory"]] = entry["split"]
        samples = list(iter_shard(path))
        assert len(samples) == entry["samples"] == cfg.frames
        for frame, sample in enumerate(samples):
            assert sample["__key__"] == f"{entry['domain']}_{entry['trajectory']:05d}_{frame:05d}"
            u, mask, meta = sample["u.npy"], sample["mask.npy"], sample["meta.json"]
            assert u.dtype == np.float32 and u.shape == (3, n, n, n)
            assert mask.dtype == np.uint8 and mask.shape == (n, n, n)
            assert {"domain", "trajectory", "t", "dt", "grid", "nu", "forcing", "solver"} <= set(meta)
            assert meta["domain"] == entry["domain"] and meta["split"] == entry["split"]
    for domain, splits in trajectories.items():
        counts = {s: list(splits.values()).count(s) for s in SPLITS}
        assert counts == {"train": 2, "val": 1, "test": 1}, (domain, counts)
        assert manifest["counts"]["train"][domain] == {"trajectories": 2, "samples": 2 * cfg.frames}


def test_stored_velocity_is_divergence_free_and_domains_differ(smoke_root):
    by_domain = {}
    for shard in sorted((smoke_root / "raw" / "val").glob("*.tar")):
        for sample in iter_shard(shard):
            u = torch.from_numpy(sample["u.npy"])
            assert divergence_stats(u.double()[None], "spectral")["rel_max"] <= 1e-5
            by_domain.setdefault(sample["meta.json"]["domain"], []).append(sample)
    channel, porous = by_domain["channel"], by_domain["porous"]
    # channel: wall slab, a streamwise mean flow; porous: spheres at 0.6-0.8 porosity
    assert channel[0]["mask.npy"][:, :, 0].all() and not channel[0]["mask.npy"][:, :, 16].any()
    assert 0.55 <= 1 - porous[0]["mask.npy"].mean() <= 0.85
    for frames in (channel, porous):
        a, b = frames[0]["u.npy"], frames[-1]["u.npy"]
        assert np.abs(a - b).max() > 1e-3 * np.abs(a).max()  # frames evolve


def test_manifest_statistics_match_train_shards(smoke_root):
    manifest = json.loads((smoke_root / "raw" / "manifest.json").read_text())
    for domain in manifest["domains"]:
        fields = [s["u.npy"].astype(np.float64) for shard in sorted((smoke_root / "raw" / "train").glob(f"{domain}-*.tar"))
                  for s in iter_shard(shard)]
        stack = np.stack(fields)
        np.testing.assert_allclose(manifest["stats"][domain]["mean"], stack.mean(axis=(0, 2, 3, 4)), atol=1e-9)
        np.testing.assert_allclose(manifest["stats"][domain]["std"], stack.std(axis=(0, 2, 3, 4)), rtol=1e-6)


def test_rerun_resumes_and_is_deterministic(smoke_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(smoke_root, root)
    victim = root / "raw" / "train" / "porous-000001.tar"
    original_sha = sha256_file(victim)
    victim.unlink()
    (root / "raw" / "parts" / "porous-000001.json").unlink()
    untouched = root / "raw" / "val" / "channel-000002.tar"
    mtime = untouched.stat().st_mtime_ns
    proc = shodh("simulate", "--profile", "smoke", "--root", str(root))
    assert "already complete" in proc.stderr
    assert sha256_file(victim) == original_sha  # regenerated bit for bit
    assert untouched.stat().st_mtime_ns == mtime  # completed trajectories were skipped


def test_other_config_refused_unless_overwrite(smoke_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(smoke_root, root)
    proc = shodh("simulate", "--profile", "smoke", "--root", str(root), "sim.frames=3", check=False)
    assert proc.returncode == 2
    assert "another simulation config" in proc.stderr and "--overwrite" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    cfg = load_config("smoke", ["sim.frames=2", "sim.trajectories.train=1", "sim.trajectories.val=0",
                                "sim.trajectories.test=0", "sim.domains=[porous]"])
    manifest = simulate.run(cfg.sim, cfg.seed, root, overwrite=True)
    assert manifest["counts"]["train"]["porous"]["samples"] == 2
    assert not (root / "raw" / "train" / "channel-000000.tar").exists()


def test_data_of_an_older_solver_is_refused_naming_both_versions(smoke_root, tmp_path):
    root = tmp_path / "old"
    shutil.copytree(smoke_root, root)
    manifest_path = root / "raw" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    old = "shodh-ns-1 (pseudo-spectral, IF-SSP-RK3, 2/3 dealiasing, split Brinkman)"
    manifest["generator"]["solver"] = old
    manifest_path.write_text(json.dumps(manifest))
    for verb in (["simulate"], ["train-tokenizer"]):
        proc = shodh(*verb, "--profile", "smoke", "--root", str(root), check=False)
        assert proc.returncode == 2, proc.stderr
        assert old in proc.stderr and simulate.SOLVER_VERSION in proc.stderr and "--overwrite" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    frame_meta = next(iter_shard(root / "raw" / manifest["shards"][0]["path"]))["meta.json"]
    assert frame_meta["solver"] == simulate.SOLVER_VERSION  # every frame names its solver too


def test_crash_mid_trajectory_leaves_no_partial_shard(tmp_path, monkeypatch):
    cfg = load_config("smoke", ["sim.domains=[porous]", "sim.trajectories.train=1", "sim.trajectories.val=0",
                                "sim.trajectories.test=0", "sim.porous.spinup_time=0.5"]).sim
    calls = {"n": 0}
    real = simulate._advance

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("simulated crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(simulate, "_advance", flaky)
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate.run(cfg, 0, tmp_path)
    leftovers = [p.name for p in (tmp_path / "raw").rglob("*") if p.is_file()]
    assert leftovers == [], leftovers
    monkeypatch.setattr(simulate, "_advance", real)
    manifest = simulate.run(cfg, 0, tmp_path)
    assert manifest["counts"]["train"]["porous"]["samples"] == cfg.frames


def test_corrupt_shard_error_names_shard_and_key(smoke_root, tmp_path):
    src = smoke_root / "raw" / "train" / "porous-000000.tar"
    bad = tmp_path / "bad.tar"
    with tarfile.open(src) as tin, tarfile.open(bad, "w") as tout:
        for member in tin.getmembers():
            data = tin.extractfile(member).read()
            if member.name.endswith("00001.u.npy"):
                data = b"garbage" + data[7:]
            member.size = len(data)
            import io
            tout.addfile(member, io.BytesIO(data))
    from shodh.errors import DataError
    with pytest.raises(DataError, match=r"bad.tar: sample 'porous_00000_00001', member 'u.npy'"):
        list(iter_shard(bad))
    truncated = tmp_path / "trunc.tar"
    truncated.write_bytes(src.read_bytes()[: src.stat().st_size // 3])
    with pytest.raises(DataError, match="trunc.tar"):
        list(iter_shard(truncated))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--profile", "nosuch"], "unknown profile 'nosuch'"),
        (["sim.domains=[channel, lava]"], "sim.domains[1]"),
        (["sim.grid"], "bad override 'sim.grid'"),
        (["sim.gridd=32"], "sim.gridd: unknown key"),
        (["sim.grid=4096"], "GiB available; lower sim.grid"),  # refused before any allocation
    ],
)
def test_cli_bad_input_one_line_errors(tmp_path, args, needle):
    argv = ["simulate", "--root", str(tmp_path / "w"), *(args if args[0] == "--profile" else ["--profile", "smoke", *args])]
    proc = shodh(*argv, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shodh: error:") and needle in lines[0], proc.stderr


def test_cli_unwritable_root(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    proc = shodh("simulate", "--profile", "smoke", "--root", str(blocker / "sub"), check=False)
    assert proc.returncode == 2 and "not writable" in proc.stderr and str(blocker) in proc.stderr


def test_channel_settle_record_and_physics_report_on_the_frames(smoke_root, tmp_path):
    # The settle phase's record is the stationarity evidence the README quotes; the report
    # reads it and the stored frames, and plots them.
    record = json.loads((smoke_root / "raw" / "spinup" / "channel.json").read_text())
    settle = record["settle"]
    assert record["solver"] == simulate.SOLVER_VERSION and settle["grid"] == 32 and settle["steps"] > 0
    assert len(settle["series"]["t"]) == len(settle["series"]["ub_plus"]) >= 5  # one sample per time unit
    assert 5 < settle["ub_plus"] < 30 and settle["wall_stress_plus"] > 0
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import physics_report
    finally:
        sys.path.pop(0)
    channel = physics_report.frames_profile(smoke_root)
    assert channel["frames"] == 4 * 4 and channel["grid"] == 32
    y_plus = channel["stats"]["profile"]["y_plus"]
    assert y_plus[0] > 0 and abs(y_plus[-1] - 120.0) < 1e-6  # first fluid point .. the free surface at Re_tau
    assert channel["check"]["ub_plus_correlation"] > 14
    plot = tmp_path / "law.png"
    physics_report.plot_channel(channel, plot)
    assert plot.stat().st_size > 10_000
    # a workspace holding only the spin-up (the paper profile's check) is judged on the settle window
    spun = tmp_path / "spun"
    shutil.copytree(smoke_root / "raw" / "spinup", spun / "raw" / "spinup")
    alone = physics_report.frames_profile(spun)
    assert alone["frames"] == 0 and alone["grid"] == 32
    assert alone["check"]["ub_plus"] == settle["ub_plus"] and alone["stats"]["profile"] == settle["profile"]
