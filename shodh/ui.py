"""`shodh ui --root DIR`: the MLflow UI over the workspace's tracking store, on 127.0.0.1.

Runs `mlflow server` (this Python's mlflow) against ROOT/mlflow.db (or `tracking.uri`), with
artifacts served from ROOT/mlartifacts, one worker and MLflow 3's job runner switched off
(`MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false`): that is what makes it start in seconds on a small
machine. The process becomes the server (exec), so stopping it stops the server.

MLflow 3 opens an experiment in its GenAI view; the runs table with our metrics is
  http://HOST:PORT/#/experiments/<experiment-id>/runs?workflowType=machine_learning
and selecting runs there, then "Compare", opens the compare view
  http://HOST:PORT/#/compare-runs?runs=["<run-id-1>","<run-id-2>"]&experiments=["<experiment-id>"]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from shodh.distributed import child_env
from shodh.errors import ShodhError
from shodh.tracking import TrackingConfig, tracking_uri
from shodh.workspace import mlflow_artifacts


def server_command(cfg: TrackingConfig, root: Path, host: str, port: int) -> tuple[list[str], dict[str, str]]:
    """(argv, environment) of the MLflow server for this workspace."""
    uri = tracking_uri(cfg, root)
    if not uri.startswith(("sqlite:", "postgresql:", "mysql:", "mssql:")) and "://" in uri:
        raise ShodhError(f"tracking URI {uri} is already a server (MLFLOW_TRACKING_URI or tracking.uri): open it "
                         f"in a browser instead of starting another")
    artifacts = mlflow_artifacts(root)
    argv = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
            "--artifacts-destination", artifacts.as_uri(), "--host", host, "--port", str(port), "--workers", "1"]
    env = child_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return argv, env


def run_ui(cfg: TrackingConfig, root: Path, host: str, port: int) -> None:
    """Replace this process by the MLflow server (returns only on failure to start it)."""
    argv, env = server_command(cfg, root, host, port)
    print(f"MLflow UI for {Path(root).resolve()} at http://{host}:{port} (Ctrl-C stops it)\n"
          f"runs table: http://{host}:{port}/#/experiments/<id>/runs?workflowType=machine_learning "
          f"(tick runs, then Compare)", flush=True)
    os.execvpe(argv[0], argv, env)
