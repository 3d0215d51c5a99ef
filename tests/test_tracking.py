"""Tracking that never stalls or duplicates, and paths that stay inside the root.

MLflow here is real: a closed port, a real `mlflow server` killed mid-run, the embedded sqlite
store (also created by two processes at once), and a read-only bind mount for the verbs that
only read. Timing bounds are generous for a loaded 2-core box and far below MLflow's defaults
(a 120 s timeout and 7 retries with backoff: minutes per call against a dead server).
"""

from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from conftest import skip_unless_ci, wait_healthy
from latent_fixture import make_latents
from shodh.cli import main
from shodh.config import load_config
from shodh.distributed import MLFLOW_HTTP_BOUNDS, bound_mlflow_http
from shodh.errors import ConfigError
from shodh.tracking import DROPPED_KEY, QUEUE_CALLS, Tracker, TrackingConfig
from shodh.workspace import check_name, resolve_run_dir

STEPS = 20
BOUND_S = 20.0  # 20 steps plus close against a dead server; MLflow's defaults take minutes


@pytest.fixture
def default_http(monkeypatch):
    """MLflow's HTTP variables unset (as for a user who never heard of them), restored afterwards."""
    for name in MLFLOW_HTTP_BOUNDS:
        monkeypatch.setenv(name, "unused")  # records the original value, so teardown restores it
        monkeypatch.delenv(name)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _log_steps(tracker: Tracker, steps: range) -> None:
    for step in steps:
        tracker.log_metrics({"train/loss": 1.0 / step, "perf/tokens_per_s": 100.0 * step}, step)


def _assert_all_steps_and_dropped(run_dir: Path) -> None:
    lines = _lines(run_dir)
    assert [x["step"] for x in lines if "train/loss" in x] == list(range(1, STEPS + 1))
    dropped = [x[DROPPED_KEY] for x in lines if DROPPED_KEY in x]
    assert len(dropped) == 1 and dropped[0] > 0, lines[-3:]


# ------------------------------------------------------------ 1. a dead server never stalls training


def test_closed_port_costs_seconds_not_minutes(tmp_path, default_http):
    cfg = TrackingConfig(uri=f"http://127.0.0.1:{_free_port()}")  # nothing listens there
    t0 = time.monotonic()
    tracker = Tracker(cfg, tmp_path, tmp_path / "run", "offline", params={"a": 1}, tags={"model": "moe"})
    _log_steps(tracker, range(1, STEPS + 1))
    tracker.set_tags({"x": "y"})
    tracker.close("FINISHED")
    assert time.monotonic() - t0 < BOUND_S
    _assert_all_steps_and_dropped(tmp_path / "run")


def test_http_bounds_keep_the_users_values(default_http, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    assert bound_mlflow_http() == {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "0"


@pytest.fixture
def mlflow_server(tmp_path):
    """A real `mlflow server` (sqlite store, one worker): (url, kill)."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{tmp_path / 'server.db'}", "--artifacts-destination",
                                 (tmp_path / "server-artifacts").as_uri(), "--host", "127.0.0.1",
                                 "--port", str(port), "--workers", "1"],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def kill() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # the server and its worker: dead, port closed
            proc.wait()

    try:
        wait_healthy(url, proc, log)
        yield url, kill
    finally:
        kill()


def test_server_killed_mid_run_costs_seconds_not_minutes(tmp_path, default_http, mlflow_server):
    import mlflow

    url, kill = mlflow_server
    run_dir = tmp_path / "run"
    tracker = Tracker(TrackingConfig(uri=url), tmp_path, run_dir, "killed", params={"a": 1})
    _log_steps(tracker, range(1, 6))
    client = mlflow.MlflowClient(url)
    deadline = time.monotonic() + 60
    while len(client.get_metric_history(tracker.run_id, "train/loss")) < 5:  # mirrored while alive
        assert time.monotonic() < deadline, "the first 5 steps never reached the live server"
        time.sleep(0.2)
    kill()
    t0 = time.monotonic()
    _log_steps(tracker, range(6, STEPS + 1))
    tracker.close("FINISHED")
    assert time.monotonic() - t0 < BOUND_S
    _assert_all_steps_and_dropped(run_dir)


def test_a_hung_server_fills_the_queue_not_the_step_time(tmp_path, default_http, monkeypatch):
    """MLflow that accepts calls and never answers: steps go on, the bounded queue drops (and
    counts) what does not fit, and close gives up after its wait; nothing is lost from metrics.jsonl."""
    import shodh.tracking

    monkeypatch.setattr(shodh.tracking, "CLOSE_WAIT_S", 1.0)
    tracker = Tracker(TrackingConfig(), tmp_path, tmp_path / "run", "run")
    release = threading.Event()

    class Hung:  # stands in for the connected MlflowClient
        def log_batch(self, *args, **kwargs) -> None:
            release.wait(60)

        def set_terminated(self, *args, **kwargs) -> None:
            pass

    tracker._client = Hung()
    steps = QUEUE_CALLS + 500
    t0 = time.monotonic()
    for step in range(1, steps + 1):
        tracker.log_metrics({"x": float(step)}, step)
    assert time.monotonic() - t0 < BOUND_S
    assert tracker.dropped >= steps - QUEUE_CALLS - 1  # the rest is queued or in flight
    t0 = time.monotonic()
    tracker.close()
    assert time.monotonic() - t0 < 1.0 + 5.0
    release.set()
    lines = _lines(tmp_path / "run")
    assert [x["step"] for x in lines if "x" in x] == list(range(1, steps + 1))
    assert lines[-1][DROPPED_KEY] == steps  # dropped when full, or still queued when close gave up


# ------------------------------------------------------------ 2. each (key, step) once, in both places


def test_resume_truncates_metrics_and_never_resends_to_mlflow(tmp_path, default_http):
    import mlflow

    run_dir = tmp_path / "run"
    cfg = TrackingConfig()  # the embedded store ROOT/mlflow.db

    # attempt 1 logged steps 1-54; the last checkpoint was step 50, then it crashed
    first = Tracker(cfg, tmp_path, run_dir, "run", resume_step=0)
    _log_steps(first, range(1, 55))
    first.close("FAILED")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    # attempt 2 resumes at step 50 and logs 51-60 again (other values: another data order, say)
    second = Tracker(cfg, tmp_path, run_dir, "run", resume_step=50)
    assert second.run_id == run_id
    for step in range(51, 61):
        second.log_metrics({"train/loss": 1000.0 + step}, step)
    second.close()
    # evaluation appends into the same run at the checkpoint's step (resume_step=None)
    evaluation = Tracker(cfg, tmp_path, run_dir, "run")
    evaluation.log_metrics({"val/vrmse": 0.5}, 60)
    evaluation.close()

    lines = _lines(run_dir)
    loss = [(x["step"], x["train/loss"]) for x in lines if "train/loss" in x]
    assert [s for s, _ in loss] == list(range(1, 61))  # each step once in metrics.jsonl
    assert dict(loss)[51] == 1051.0  # the resumed attempt's values
    assert [x["step"] for x in lines if "perf/tokens_per_s" in x] == list(range(1, 51))
    assert lines[-1]["val/vrmse"] == 0.5 and not any(DROPPED_KEY in x for x in lines)

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    for key, steps in (("train/loss", range(1, 61)), ("perf/tokens_per_s", range(1, 55)), ("val/vrmse", [60])):
        counts = collections.Counter(m.step for m in client.get_metric_history(run_id, key))
        assert sorted(counts) == list(steps) and set(counts.values()) == {1}, (key, counts)
    assert client.get_run(run_id).info.status == "FINISHED"

    # a restart before the first checkpoint (resume at 0) starts metrics.jsonl over, and still
    # sends MLflow none of the points it already has
    again = Tracker(cfg, tmp_path, run_dir, "run", resume_step=0)
    _log_steps(again, range(1, 4))
    again.close()
    assert [x["step"] for x in _lines(run_dir)] == [1, 2, 3]
    counts = collections.Counter(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert set(counts.values()) == {1}


def test_pretrain_restart_before_the_first_checkpoint_logs_each_step_once(tmp_path):
    """The Trainer's wiring: a run that crashed before its first checkpoint (here: its checkpoints
    removed) starts over at step 0; metrics.jsonl and MLflow then hold steps 1-3 once each."""
    import mlflow

    root = tmp_path / "root"
    make_latents(root)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "RANK", "LOCAL_RANK",
                                                            "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "shodh" / "torch_extensions"))
    args = [sys.executable, "-m", "shodh.pretrain", "--profile", "smoke", "--root", str(root), "--run-name", "r",
            "train.max_steps=3", "train.val_every=100", "train.route_every=100"]
    run_dir = root / "runs" / "shodh" / "r"
    for _ in range(2):
        proc = subprocess.run(args, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        shutil.rmtree(run_dir / "checkpoints")  # as if it had crashed before checkpointing
    assert [x["step"] for x in _lines(run_dir) if "train/loss" in x] == [1, 2, 3]
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    history = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}").get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == [1, 2, 3]


def test_truncation_survives_a_torn_last_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "a": 1.0}\n{"step": 2, "a": 2.0}\n{"step": 3, "a"')
    Tracker(TrackingConfig(mlflow=False), tmp_path, run_dir, "run", resume_step=2).close()
    assert [x["step"] for x in _lines(run_dir)] == [1, 2]


# ------------------------------------------------------------ 3. nothing outside the root


def test_sqlite_uri_keeps_artifacts_in_the_root(tmp_path, default_http, monkeypatch):
    import mlflow

    root, cwd = tmp_path / "root", tmp_path / "cwd"
    root.mkdir()
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    uri = f"sqlite:///{root / 'mlflow.db'}"  # the README's cluster setup
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    (root / "note.txt").write_text("hello")
    tracker = Tracker(TrackingConfig(), root, root / "runs" / "shodh" / "r", "r")
    tracker.log_artifact(root / "note.txt", "notes")
    tracker.close()
    assert not (cwd / "mlruns").exists()
    location = mlflow.MlflowClient(uri).get_experiment_by_name("shodh").artifact_location
    assert location == (root / "mlartifacts").resolve().as_uri()
    assert list((root / "mlartifacts").rglob("note.txt"))


BAD_NAMES = ["", " ", ".", "..", "../../x", "/abs/path", "a/b", "a\\b", ".hidden", "tab\there", "nul\0"]


@pytest.mark.parametrize("value", BAD_NAMES)
def test_check_name_refuses_path_like_names(value):
    with pytest.raises(ConfigError) as err:
        check_name(value, "tracking.experiment")
    message = str(err.value)
    assert message.startswith("tracking.experiment: ") and "\n" not in message


def test_check_name_accepts_plain_names():
    for value in ("shodh", "demo-moe", "study_1.v2", "Run 3", "ünïcode"):
        assert check_name(value, "x") == value


@pytest.mark.parametrize("override,field", [("tracking.experiment=../../x", "tracking.experiment"),
                                            ("tokenizer.run_name=.hidden", "tokenizer.run_name"),
                                            ("tokenizer.experiment=a/b", "tokenizer.experiment"),
                                            ("study.name=/abs/path", "study.name")])
def test_config_names_are_plain(override, field):
    with pytest.raises(ConfigError, match=f"^{field}: "):
        load_config("smoke", [override])


def test_run_name_outside_the_root_is_refused(tmp_path):
    outside = tmp_path / "outside" / "x"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.run([sys.executable, "-m", "shodh", "pretrain", "--profile", "smoke", "--root",
                           str(tmp_path / "root"), "--run-name", str(outside)],
                          env={**env, "DS_ACCELERATOR": "cpu"}, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and "--run-name" in proc.stderr, proc.stderr
    assert not (tmp_path / "outside").exists()


def test_evaluate_run_may_still_be_a_directory(tmp_path):
    run = tmp_path / "elsewhere" / "r1"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text("{}\n")
    assert resolve_run_dir(str(run), tmp_path / "root", "shodh") == run
    named = tmp_path / "root" / "runs" / "shodh" / "r2"
    named.mkdir(parents=True)
    (named / "config.yaml").write_text("{}\n")
    assert resolve_run_dir("r2", tmp_path / "root", "shodh") == named


# ------------------------------------------------------------ 4. two processes on a fresh store

RACER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import mlflow.store.tracking.sqlalchemy_store  # imported before the start line: only the store races
    from shodh.tracking import Tracker, TrackingConfig
    root, name, go = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
    (root.parent / f"{name}.ready").touch()
    while not go.exists():
        time.sleep(0.001)
    tracker = Tracker(TrackingConfig(), root, root / "runs" / "shodh" / name, name)
    tracker.log_metrics({"x": 1.0}, 1)
    tracker.close()
""")


def test_two_processes_create_the_embedded_store_at_once(tmp_path, default_http):
    import mlflow

    root, go = tmp_path / "root", tmp_path / "go"
    root.mkdir()
    names = ["a", "b"]
    env = {**{k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}, "DS_ACCELERATOR": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", RACER, str(root), n, str(go)], env=env, cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for n in names]
    try:
        deadline = time.monotonic() + 120
        while not all((tmp_path / f"{n}.ready").exists() for n in names):
            assert time.monotonic() < deadline and all(p.poll() is None for p in procs), "racers did not start"
            time.sleep(0.05)
        go.touch()
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not any("MLflow unavailable" in out for out in outputs), outputs
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    for n in names:
        run_id = (root / "runs" / "shodh" / n / "mlflow_run_id").read_text().strip()
        assert [m.value for m in client.get_metric_history(run_id, "x")] == [1.0], (n, outputs)


# ------------------------------------------------------------ 5. verbs that only read accept a read-only root


@pytest.fixture
def read_only_root(tmp_path):
    """A workspace on a real read-only filesystem (a read-only bind mount; needs root, which the
    test box has: chmod would not stop root from writing)."""
    src, ro = tmp_path / "src", tmp_path / "ro"
    (src / "runs").mkdir(parents=True)
    ro.mkdir()
    mounted = subprocess.run(["mount", "--bind", "-o", "ro", str(src), str(ro)], capture_output=True, text=True)
    if mounted.returncode != 0:
        skip_unless_ci(f"cannot make a read-only bind mount here: {mounted.stderr.strip()}")
    try:
        probe = ro / "probe"
        with pytest.raises(OSError):
            probe.write_text("x")  # it really is read-only
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_ui_serves_a_read_only_root(read_only_root, monkeypatch, default_http):
    import shodh.ui

    started = []
    monkeypatch.setattr(shodh.ui.os, "execvpe", lambda file, argv, env: started.append(argv))
    # run_ui returns only when exec failed: 1 here means the server would have been started
    assert main(["ui", "--profile", "smoke", "--root", str(read_only_root), "--port", "5999"]) == 1
    (argv,) = started
    assert argv[argv.index("--backend-store-uri") + 1] == f"sqlite:///{read_only_root.resolve() / 'mlflow.db'}"


def test_audit_reads_a_read_only_root(read_only_root, capsys):
    assert main(["audit", "--profile", "smoke", "--root", str(read_only_root), "--grid", "16"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


@pytest.mark.parametrize("verb", ["ui", "audit"])
def test_read_only_verbs_need_an_existing_root(tmp_path, capsys, monkeypatch, verb):
    import shodh.ui

    monkeypatch.setattr(shodh.ui.os, "execvpe", lambda file, argv, env: None)  # never become a server here
    missing = tmp_path / "missing"
    assert main([verb, "--profile", "smoke", "--root", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--root {missing}" in err
    assert not missing.exists()
