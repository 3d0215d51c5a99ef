"""Pretraining end to end on CPU: real DeepSpeed, real launcher, gloo, tiny synthetic latents."""

from __future__ import annotations

import collections
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latent_fixture import make_latents
from shodh.errors import ShodhError
from shodh.tracking import Tracker, TrackingConfig

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SMOKE = ["--profile", "smoke"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", PYTHONPATH=str(REPO / "tests"))
    # DeepSpeed JIT-builds its CPU shared-memory comm op on first use (~2 min): keep it cached.
    e.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "shodh" / "torch_extensions"))
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
        e.pop(name, None)
    return e


def command(nproc: int, target: list[str]) -> list[str]:
    """`python -m shodh.pretrain` for one process, else the real deepspeed launcher with nproc ranks."""
    if nproc == 1:
        return [sys.executable, *target]
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()), *target]


def pretrain(root: Path, nproc: int, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    target = ["-m" if nproc == 1 else "--module", "shodh.pretrain", *SMOKE, "--root", str(root), *args]
    proc = subprocess.run(command(nproc, target), env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def losses(run_dir: Path) -> dict[int, float]:
    return {m["step"]: m["train/loss"] for m in metrics(run_dir) if "train/loss" in m}


def shm_segments() -> set[str]:
    return {p.name for p in Path("/dev/shm").glob("deepspeed_allreduce_buffer_*")}


def test_two_ranks_expert_parallel_zero2_then_weights_only_resume(root):
    before = shm_segments()
    proc = pretrain(root, 2, "--run-name", "ep2", "model.ep_size=2")
    # DeepSpeed's CPU all-reduce segments (69 MB of tmpfs per rank) are unlinked, not left behind.
    assert shm_segments() <= before
    run = root / "runs" / "shodh" / "ep2"
    assert "dist_world_size=2" in proc.stdout + proc.stderr
    assert json.loads((run / "ds_config.json").read_text())["train_batch_size"] == 2 * 2  # micro 2 x 2 ranks
    assert json.loads((run / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2
    steps = losses(run)
    assert sorted(steps) == list(range(1, 7)) and all(math.isfinite(v) for v in steps.values())
    ckpt = run / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-000006"
    assert {p.name for p in (ckpt / "step-000006").glob("rank-*.pt")} == {"rank-00000.pt", "rank-00001.pt"}
    assert json.loads((ckpt / "step-000006" / "meta.json").read_text())["ep_size"] == 2

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    mlrun = client.get_run((run / "mlflow_run_id").read_text().strip())
    keys = set(mlrun.data.metrics)
    assert {"val/channel/latent_mse", "val/porous/latent_mse", "route/layer0/domain_mi"} <= keys
    assert any(k.startswith("route/porous/layer1/expert") for k in keys)
    assert mlrun.data.tags["model"] == "moe" and mlrun.data.tags["tokenizer_id"] == "test-tokenizer-0001"
    assert mlrun.info.status == "FINISHED"
    routed = [m for m in metrics(run) if "route/layer0/entropy" in m]
    assert routed
    for m in routed:
        for domain in ("channel", "porous"):
            for layer in (0, 1):
                assert sum(m[f"route/{domain}/layer{layer}/expert{e}"] for e in range(4)) == pytest.approx(1.0)

    # Another layout cannot restore ZeRO/EP state: a clear error first, then the weights-only option.
    refused = pretrain(root, 1, "--run-name", "ep2", check=False)
    assert refused.returncode == 2 and "train.resume=weights" in refused.stderr
    resumed = pretrain(root, 1, "--run-name", "ep2", "train.resume=weights", "train.max_steps=8")
    assert "resumed weights only at step 6" in resumed.stderr
    after = losses(run)
    assert sorted(after) == list(range(1, 9)) and math.isfinite(after[8])
    assert after[7] < 1.5 * max(steps.values())  # continued from trained weights, not diverged


def test_gradients_equal_across_layouts(tmp_path):
    """Reference: 1 process, plain autograd over two micro batches. DeepSpeed ZeRO-2 with
    2 ranks x 1 micro batch, expert-parallel size 1 and 2: same loss, same full gradients; and every
    model.router variant equal between the two layouts (the same launches)."""
    results = {}
    for label, nproc, ep in (("ref", 1, 1), ("dp2_ep1", 2, 1), ("dp2_ep2", 2, 2)):
        out = tmp_path / label
        cmd = command(nproc, [str(REPO / "tests" / "grad_probe.py"), str(ep), str(out)] + ([VARIANTS] if nproc == 2 else []))
        proc = subprocess.run(cmd, env=env(), cwd=REPO, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        results[label] = [torch.load(out / f"rank-{r}.pt", weights_only=True) for r in range(nproc)]
    (ref,) = results["ref"]
    assert all(g.abs().sum() > 0 for g in ref["grads"].values())
    for label in ("dp2_ep1", "dp2_ep2"):
        ranks = results[label]
        assert len(ranks) == 2
        for r in ranks:
            assert r["loss"] == pytest.approx(ref["loss"], rel=1e-6, abs=0)
        for name, g_ref in ref["grads"].items():
            held = [r["grads"][name] for r in ranks if name in r["grads"]]
            assert held, f"{label}: no rank holds {name}"
            for g in held:
                torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-7, msg=f"{label}: {name}")
    # With ep=2 each rank holds half of the experts: rank 1 has global experts 2 and 3.
    assert "blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.3.fc1.weight" in results["dp2_ep2"][1]["grads"]
    assert "blocks.0.ffn.moe.deepspeed_moe.experts.deepspeed_experts.0.fc1.weight" not in results["dp2_ep2"][1]["grads"]
    router_variants_equal_across_layouts(tmp_path / "dp2_ep1", tmp_path / "dp2_ep2")


VARIANTS = "global,bias,none,zloss,sample"


def router_variants_equal_across_layouts(ep1: Path, ep2: Path) -> None:
    """Every model.router variant: 2 ranks with ep_size 1 and 2 give the same loss, the same full
    gradients (global expert names) and, for balance=bias, the same biases after an update."""
    for variant in VARIANTS.split(","):
        one = [torch.load(ep1 / f"rank-{r}-{variant}.pt", weights_only=True) for r in range(2)]
        two = [torch.load(ep2 / f"rank-{r}-{variant}.pt", weights_only=True) for r in range(2)]
        assert one[0]["loss"] == pytest.approx(two[0]["loss"], rel=1e-6, abs=0), variant
        for name, g in one[0]["grads"].items():
            held = [r["grads"][name] for r in two if name in r["grads"]]
            assert held, f"{variant}: no ep=2 rank holds {name}"
            for h in held:
                torch.testing.assert_close(h, g, rtol=1e-5, atol=1e-7, msg=f"{variant}: {name}")
        for a, b in zip(one[0]["biases"] + one[1]["biases"], two[0]["biases"] + two[1]["biases"], strict=True):
            torch.testing.assert_close(a, b)
    bias = torch.load(ep2 / "rank-0-bias.pt", weights_only=True)
    assert bias["biases"] and all(b.abs().sum() > 0 for b in bias["biases"])
    zloss, none = (torch.load(ep1 / f"rank-0-{v}.pt", weights_only=True) for v in ("zloss", "none"))
    assert zloss["loss"] != pytest.approx(none["loss"], rel=1e-9)  # the z-loss term is in the objective


def test_kill_9_then_resume_matches_uninterrupted(root):
    """Losses after a kill -9 and a resume equal an uninterrupted run's; with balance=bias the router's
    biases (module state in the checkpoint) continue exactly too."""
    args = ["train.max_steps=10", "train.ckpt_every=2", "train.val_every=100", "train.route_every=100",
            "model.router.balance=bias", "model.router.bias_rate=0.01"]
    pretrain(root, 1, "--run-name", "reference", *args)
    run = root / "runs" / "shodh" / "killed"
    target = ["-m", "shodh.pretrain", *SMOKE, "--root", str(root), "--run-name", "killed", *args]
    proc = subprocess.Popen(command(1, target), env=env(), cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while not (run / "checkpoints" / "latest").exists() and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    killed_at = int((run / "checkpoints" / "latest").read_text().removeprefix("step-"))
    resumed = pretrain(root, 1, "--run-name", "killed", *args)
    assert f"resumed fully at step {killed_at}" in resumed.stderr
    ref, got = losses(root / "runs" / "shodh" / "reference"), losses(run)
    assert sorted(got) == list(range(1, 11))  # each step once: lines after the checkpoint were dropped
    for step in range(1, 11):
        assert got[step] == pytest.approx(ref[step], abs=1e-6), step

    def biases(run_dir: Path) -> dict:
        rows = [r for r in metrics(run_dir) if r["step"] == 10 and any(k.startswith("route/layer0/bias") for k in r)]
        return {k: v for k, v in rows[-1].items() if "/bias" in k}

    assert biases(run) and biases(run) == pytest.approx(biases(root / "runs" / "shodh" / "reference"), abs=1e-7)
    assert any(v != 0 for v in biases(run).values())


def test_diverging_run_stops_naming_a_finite_checkpoint_outside_the_streak(root):
    """lr=1e6: step 1 applies (weights blow up, still finite), then every step is non-finite. No
    checkpoint is written inside the streak, and the one named on stopping loads back finite."""
    proc = pretrain(root, 1, "--run-name", "diverge", "train.lr=1e6", "train.ckpt_every=1", "train.max_bad_steps=3",
                    "tracking.mlflow=false", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    error = proc.stderr.strip().splitlines()[-1]
    assert "3 of the last 4 steps had non-finite gradients" in error
    assert "Last good checkpoint (loads, finite weights): step-000001" in error
    ckpt = root / "runs" / "shodh" / "diverge" / "checkpoints"
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-000001"]  # none inside the streak
    assert (ckpt / "latest").read_text() == "step-000001" and (ckpt / "step-000001" / "MANIFEST.json").is_file()
    rows = metrics(ckpt.parent)
    assert [m["train/skipped_steps"] for m in rows if "train/skipped_steps" in m][-1] == 3


def test_skipped_samples_reach_the_metrics(tmp_path):
    """data.on_error=skip: a latent shard that fails its checksum is skipped, and the count is logged."""
    make_latents(tmp_path, trajectories={"train": 3, "val": 1})
    shard = next((tmp_path / "latents").glob("*/train/channel-*.tar"))
    data = bytearray(shard.read_bytes())
    data[-2048] ^= 1  # inside the last sample's payload or padding: the sha256 changes
    shard.write_bytes(bytes(data))
    pretrain(tmp_path, 1, "data.on_error=skip", "tracking.mlflow=false", "train.max_steps=4", "train.log_every=1")
    rows = metrics(tmp_path / "runs" / "shodh" / "smoke-moe")
    assert max(m.get("train/skipped_samples", 0) for m in rows) > 0


def test_interleaved_bad_steps_trip_the_window():
    """Good and bad steps alternating never make a streak of max_bad_steps; the window catches them."""
    from types import SimpleNamespace

    from shodh.config import load_config
    from shodh.train.trainer import Trainer

    logged = []
    t = Trainer.__new__(Trainer)
    t.cfg = load_config("smoke", ["train.max_bad_steps=3", "train.bad_window=8"])
    t.tracker = SimpleNamespace(log_metrics=lambda m, step: logged.append((step, m)))
    t.last_good, t.ckpt_dir, t.skipped, t.nonfinite_losses, t.bad_in_row = None, Path("/x"), 0, 0, 0
    t.recent_bad = collections.deque(maxlen=8)
    t._count_bad(1, applied=True)
    t._count_bad(2, applied=False)
    t._count_bad(3, applied=True)
    t._count_bad(4, applied=False)
    t._count_bad(5, applied=True)
    with pytest.raises(ShodhError, match="3 of the last 6 steps"):
        t._count_bad(6, applied=False)
    assert logged[-1][1]["train/skipped_steps"] == 3


def test_checkpoint_manifest_refuses_tampering_and_foreign_model(root):
    """Every checkpoint carries a sha256 manifest, verified before DeepSpeed unpickles anything."""
    args = ["--run-name", "integrity", "train.ckpt_every=2", "tracking.mlflow=false"]
    pretrain(root, 1, *args, "train.max_steps=2")
    tag = root / "runs" / "shodh" / "integrity" / "checkpoints" / "step-000002"
    manifest = json.loads((tag / "MANIFEST.json").read_text())["files"]
    assert {"mp_rank_00_model_states.pt", "meta.json", "rank-00000.pt"} <= set(manifest)

    states = tag / "mp_rank_00_model_states.pt"
    original = states.read_bytes()
    states.write_bytes(original[:-8] + bytes(8))  # same size, other bytes
    proc = pretrain(root, 1, *args, "train.max_steps=4", check=False)
    assert proc.returncode == 2 and "mp_rank_00_model_states.pt: sha256" in proc.stderr, proc.stderr[-2000:]
    states.write_bytes(original)

    (tag / "MANIFEST.json").rename(tag / "manifest.saved")
    proc = pretrain(root, 1, *args, "train.max_steps=4", check=False)
    assert proc.returncode == 2 and "no MANIFEST.json" in proc.stderr and "--trust-checkpoint" in proc.stderr
    proc = pretrain(root, 1, *args, "train.max_steps=4", "--trust-checkpoint")
    assert "resumed fully at step 2" in proc.stderr

    proc = pretrain(root, 1, *args, "train.max_steps=6", "model.dim=64", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "model.dim: checkpoint 32, now 64" in proc.stderr.strip().splitlines()[-1]


def test_second_process_on_a_run_is_refused(root):
    from shodh.io import RunLock
    from shodh.workspace import lock_file

    run = root / "runs" / "shodh" / "locked"
    with RunLock(lock_file(run, "rank0"), "test holder"):
        t0 = time.monotonic()
        proc = pretrain(root, 1, "--run-name", "locked", "tracking.mlflow=false", check=False)
    assert proc.returncode == 2 and f"in use by pid {os.getpid()}" in proc.stderr, proc.stderr[-2000:]
    assert time.monotonic() - t0 < 60 and not (run / "checkpoints").exists()


def test_run_lock_of_a_killed_process_is_taken_over(tmp_path, caplog):
    from shodh.errors import DataError
    from shodh.io import RunLock

    path = tmp_path / ".lock-rank0"
    holder = subprocess.Popen([sys.executable, "-c", f"from shodh.io import RunLock; import time\n"
                               f"with RunLock({str(path)!r}, 'x'):\n    print('held', flush=True); time.sleep(600)"],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DataError, match=f"in use by pid {holder.pid}"):
        RunLock(path, "run x").__enter__()
    holder.kill()
    holder.wait()
    with caplog.at_level("WARNING"), RunLock(path, "run x"):
        assert f"stale lock of pid {holder.pid}" in caplog.text
    assert path.read_text() == ""  # released cleanly: an empty record


def test_full_disk_during_checkpoint_is_one_line(root):
    ckpt = root / "runs" / "shodh" / "full" / "checkpoints"
    ckpt.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(ckpt)], check=True)
    try:
        proc = pretrain(root, 1, "--run-name", "full", "train.max_steps=2", "train.ckpt_every=2",
                        "tracking.mlflow=false", check=False)
    finally:
        subprocess.run(["umount", str(ckpt)], check=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "is the disk full? no earlier checkpoint exists" in proc.stderr.strip().splitlines()[-1]


def test_tracker_survives_unreachable_mlflow(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "2")
    cfg = TrackingConfig(uri="http://127.0.0.1:9")  # discard port: connection refused
    tracker = Tracker(cfg, tmp_path, tmp_path / "run", "offline", params={"a": 1}, tags={"model": "moe"})
    for step in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (step + 1)}, step)
    tracker.set_tags({"x": "y"})
    tracker.close()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if "train/loss" in x] == [0, 1, 2] and lines[2]["train/loss"] == pytest.approx(1 / 3)
    assert lines[-1]["tracking/dropped"] == 5  # the run, 3 metric batches and the tags never reached MLflow
