"""Shared fixtures. `served_workspace`: one tiny workspace whose runs are logged through a real
MLflow server started by `shodh ui` (tests/eval_workspace.py builds it); the evaluation and UI
tests share it so the pipeline runs once per session."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SERVER_START_S = 120  # mlflow server imports for ~15 s on an idle 2-core box; far more under load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`shodh ui` exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"`shodh ui` not healthy after {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def served_workspace(tmp_path_factory):
    """(root, {"moe": run_dir, "dense": run_dir}, server url), built once per session."""
    import eval_workspace

    root = tmp_path_factory.mktemp("served")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = root / "ui.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "shodh", "ui", "--root", str(root), "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        _wait_healthy(url, proc, log)
        os.environ["MLFLOW_TRACKING_URI"] = url  # every stage logs through the server
        runs = eval_workspace.build(root)
        yield root, runs, url
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = saved
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
