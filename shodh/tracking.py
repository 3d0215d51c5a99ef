"""Experiment tracking: `metrics.jsonl` in the run directory (the source of truth) mirrored to MLflow.

Only rank 0 writes. MLflow defaults to the embedded store `sqlite:///ROOT/mlflow.db` with
artifacts under `ROOT/mlartifacts/`; `MLFLOW_TRACKING_URI` (or `tracking.uri`) points at a
server instead. A resumed run reattaches to its MLflow run through `RUN_DIR/mlflow_run_id`.
"""

from __future__ import annotations

import json
import logging
import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shodh.distributed import tracking_uri_env
from shodh.errors import check
from shodh.io import write_text_atomic
from shodh.workspace import mlflow_artifacts, mlflow_store

log = logging.getLogger(__name__)


@dataclass
class TrackingConfig:
    experiment: str = "shodh"  # MLflow experiment; runs live in ROOT/runs/<experiment>/<run>/
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///ROOT/mlflow.db
    mlflow: bool = True  # False: metrics.jsonl only

    def validate(self) -> None:
        check(bool(self.experiment.strip()), "experiment", "must not be empty")


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    return cfg.uri or tracking_uri_env() or mlflow_store(root)


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class Tracker:
    """Log metrics, params, tags and artifacts for one run (no-op on ranks other than 0)."""

    def __init__(self, cfg: TrackingConfig, root: Path, run_dir: Path, run_name: str,
                 params: dict | None = None, tags: dict | None = None, is_main: bool = True):
        self.run_dir, self.is_main, self._mlflow = Path(run_dir), is_main, None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.run_dir / "metrics.jsonl", "a", buffering=1)
        if not cfg.mlflow:
            return
        # An unreachable or broken MLflow store must not stop training: metrics.jsonl is the
        # source of truth, so any MLflow failure warns once and turns the mirror off.
        self._guard(self._connect, cfg, root, run_name, params, tags)

    def _guard(self, fn, *args) -> None:
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - any MLflow/network failure, by design
            log.warning("MLflow unavailable (%s: %s); continuing with %s only",
                        type(exc).__name__, exc, self.run_dir / "metrics.jsonl")
            self._mlflow = None

    def _connect(self, cfg: TrackingConfig, root: Path, run_name: str, params: dict | None, tags: dict | None) -> None:
        import mlflow

        uri = tracking_uri(cfg, root)
        embedded = not (cfg.uri or tracking_uri_env())
        # An explicit client, not mlflow.set_tracking_uri: that one exports MLFLOW_TRACKING_URI,
        # which would send every later Tracker of this process (another root) to this store.
        client = mlflow.MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(cfg.experiment)
        if experiment is None:
            artifacts = mlflow_artifacts(root).as_uri() if embedded else None
            experiment_id = client.create_experiment(cfg.experiment, artifact_location=artifacts)
        else:
            experiment_id = experiment.experiment_id
        id_file = self.run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        if run_id is None:
            run = client.create_run(experiment_id, run_name=run_name, tags={"git_sha": git_sha(), **(tags or {})})
            run_id = run.info.run_id
            write_text_atomic(id_file, run_id + "\n")
            from mlflow.entities import Param

            batch = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
            for i in range(0, len(batch), 100):  # MLflow caps a batch at 100 params
                client.log_batch(run_id, params=batch[i : i + 100])
        else:
            client.update_run(run_id, status="RUNNING")
        self._mlflow, self.run_id = client, run_id
        log.info("MLflow run %s in experiment '%s' at %s", run_id, cfg.experiment, uri)

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        if self._mlflow is not None and clean:
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in clean.items()]
            for i in range(0, len(batch), 900):  # MLflow caps a batch at 1000 metrics
                self._guard(lambda b: self._mlflow.log_batch(self.run_id, metrics=b), batch[i : i + 900])
                if self._mlflow is None:
                    return

    def set_tags(self, tags: dict[str, str]) -> None:
        if self._mlflow is not None:
            self._guard(lambda: [self._mlflow.set_tag(self.run_id, k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self._mlflow is not None:
            self._guard(lambda: self._mlflow.log_artifact(self.run_id, str(path), artifact_path))

    def close(self, status: str = "FINISHED") -> None:
        if not self.is_main:
            return
        self._jsonl.close()
        if self._mlflow is not None:
            self._guard(lambda: self._mlflow.set_terminated(self.run_id, status=status))
