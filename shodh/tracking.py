"""Experiment tracking: `metrics.jsonl` in the run directory (the source of truth) mirrored to MLflow.

Only rank 0 writes. MLflow defaults to the embedded store `sqlite:///ROOT/mlflow.db` with
artifacts under `ROOT/mlartifacts/`; `MLFLOW_TRACKING_URI` (or `tracking.uri`) points at a
server or another store instead. A resumed run reattaches to its MLflow run through `RUN_DIR/mlflow_run_id`.

Tracking never holds up training. `log_metrics` writes metrics.jsonl synchronously; every MLflow
call after the run is created (metric batches, params, tags, artifacts, the final status) goes
through a bounded queue to one daemon thread per Tracker, and MLflow's HTTP client gets a short
timeout and no retries (`shodh.distributed.bound_mlflow_http`). The first MLflow failure turns
the mirror off for the run; what never reached MLflow (a failed call, a call after the failure,
a batch dropped because the queue was full, a call still queued when `close` gave up waiting) is
counted, and `close` logs the count as `tracking/dropped` (metrics.jsonl, and MLflow if alive)
when it is not zero.

A Tracker opened with `resume_step=S` (a training run resumed from step S, or restarted from 0)
keeps only the metrics.jsonl lines with step <= S, and does not send MLflow again the (key, step)
pairs of the lines it dropped: those went out before, so the run's MLflow history holds each point once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import math
import queue
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from shodh.distributed import bound_mlflow_http, tracking_uri_env
from shodh.io import write_text_atomic
from shodh.workspace import check_name, mlflow_artifacts, mlflow_store

log = logging.getLogger(__name__)

DROPPED_KEY = "tracking/dropped"  # MLflow calls that never reached MLflow (logged at close when > 0)
QUEUE_CALLS = 1000  # MLflow calls waiting for the background thread; more are dropped (and counted)
CLOSE_WAIT_S = 10.0  # how long close() waits for queued calls to reach MLflow before giving up
STORE_LOCK_WAIT_S = 120.0  # how long to wait for another process creating the local store
METRICS_PER_CALL = 900  # MLflow caps a batch at 1000 metrics
PARAMS_PER_CALL = 100  # ... and at 100 params


@dataclass
class TrackingConfig:
    experiment: str = "shodh"  # MLflow experiment; runs live in ROOT/runs/<experiment>/<run>/
    uri: str = ""  # empty: $MLFLOW_TRACKING_URI, else sqlite:///ROOT/mlflow.db
    mlflow: bool = True  # False: metrics.jsonl only

    def validate(self) -> None:
        check_name(self.experiment, "experiment")  # a directory under ROOT/runs/


def tracking_uri(cfg: TrackingConfig, root: Path) -> str:
    return cfg.uri or tracking_uri_env() or mlflow_store(root)


def is_server(uri: str) -> bool:
    """A tracking server (which decides where artifacts go), as opposed to a store this process opens."""
    return uri.startswith(("http://", "https://", "databricks"))


def sqlite_file(uri: str) -> Path | None:
    """The database file of a `sqlite:///...` store URI (None for other stores and in-memory sqlite)."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///"):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


@contextlib.contextmanager
def store_lock(uri: str) -> Iterator[None]:
    """Hold `.mlflow.lock` beside a local sqlite store's database (ROOT/.mlflow.lock for the
    embedded one) while opening the store and creating the experiment: MLflow migrates a fresh
    database's schema on first open, and two processes doing that at once break it ('duplicate
    column name: step'); two creating the same experiment at once fail too. Other stores: no lock."""
    db = sqlite_file(uri)
    if db is None:
        yield
        return
    with open(db.parent / ".mlflow.lock", "a") as handle:
        deadline = time.monotonic() + STORE_LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{db.parent / '.mlflow.lock'} held for over {STORE_LOCK_WAIT_S:.0f} s") from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


def truncate_metrics(path: Path, step: int) -> dict[int, set[str]]:
    """Keep the lines of metrics.jsonl with step <= `step` (none when 0); return the metric keys of
    the dropped lines by step. A crash between checkpoints logged steps that the resumed run logs
    again; the dropped pairs are the ones MLflow already got. Unreadable lines (the torn last line
    of a killed process) are dropped with a warning."""
    if not path.is_file():
        return {}
    keep: list[str] = []
    dropped: dict[int, set[str]] = {}
    unreadable = 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            line_step = int(record["step"])
        except (ValueError, KeyError, TypeError):
            unreadable += 1
            continue
        if line_step <= step:
            keep.append(line)
        else:
            dropped.setdefault(line_step, set()).update(k for k in record if k not in ("step", "time"))
    if unreadable:
        log.warning("%s: dropped %d unreadable line(s)", path, unreadable)
    if dropped or unreadable:
        write_text_atomic(path, "".join(line + "\n" for line in keep))
    return dropped


class Tracker:
    """Log metrics, params, tags and artifacts for one run (no-op on ranks other than 0).

    `resume_step`: None appends to metrics.jsonl (evaluation, study records); a step S truncates
    it to steps <= S (a training run resumed at S, or started over at 0) and keeps MLflow from
    receiving the dropped (key, step) pairs twice.
    """

    def __init__(self, cfg: TrackingConfig, root: Path, run_dir: Path, run_name: str,
                 params: dict | None = None, tags: dict | None = None, is_main: bool = True,
                 resume_step: int | None = None):
        self.run_dir, self.is_main = Path(run_dir), is_main
        self.run_id: str | None = None
        self._client: Any = None  # the MlflowClient while the mirror is alive
        self._mirror = False  # MLflow asked for: calls that do not reach it are counted as dropped
        self._queue: queue.Queue = queue.Queue(QUEUE_CALLS)
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards the two counters
        self._dropped = self._pending = 0
        self._last_step = resume_step or 0
        self._sent: dict[int, set[str]] = {}  # step -> keys MLflow got before this resume
        self._closed = self._warned = False
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        path = self.run_dir / "metrics.jsonl"
        if resume_step is not None:
            self._sent = truncate_metrics(path, resume_step)
        self._jsonl = open(path, "a", buffering=1)
        if not cfg.mlflow:
            return
        self._mirror = True
        bound_mlflow_http()
        # An unreachable or broken MLflow store must not stop training: metrics.jsonl is the
        # source of truth, so any MLflow failure warns once and turns the mirror off.
        try:
            self._connect(cfg, root, run_name, params, tags)
        except Exception as exc:  # noqa: BLE001 - any MLflow/network failure, by design
            self._fail(exc)
            self._dropped += 1  # the run itself (and its params and tags) never reached MLflow
            return
        self._thread = threading.Thread(target=self._drain, name=f"mlflow-{run_name}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------ MLflow, on the caller's thread

    def _connect(self, cfg: TrackingConfig, root: Path, run_name: str, params: dict | None, tags: dict | None) -> None:
        """Open the store, find or create the experiment and the run (bounded: short HTTP timeouts,
        no retries). Synchronous, so RUN_DIR/mlflow_run_id exists when the constructor returns."""
        import mlflow
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException

        uri = tracking_uri(cfg, root)
        with store_lock(uri):
            # An explicit client, not mlflow.set_tracking_uri: that one exports MLFLOW_TRACKING_URI,
            # which would send every later Tracker of this process (another root) to this store.
            client = mlflow.MlflowClient(tracking_uri=uri)
            experiment = client.get_experiment_by_name(cfg.experiment)
            if experiment is None:
                # A store opened here (not a server) would put artifacts in $PWD/mlruns: keep them in the root.
                artifacts = None if is_server(uri) else mlflow_artifacts(root).as_uri()
                try:
                    experiment_id = client.create_experiment(cfg.experiment, artifact_location=artifacts)
                except MlflowException:
                    # another machine created it meanwhile (a server or shared database: no file lock there)
                    experiment = client.get_experiment_by_name(cfg.experiment)
                    if experiment is None:
                        raise
                    experiment_id = experiment.experiment_id
            else:
                experiment_id = experiment.experiment_id
        id_file = self.run_dir / "mlflow_run_id"
        run_id = id_file.read_text().strip() if id_file.exists() else None
        self._client = client
        if run_id is None:
            run = client.create_run(experiment_id, run_name=run_name, tags={"git_sha": git_sha(), **(tags or {})})
            self.run_id = run_id = run.info.run_id
            write_text_atomic(id_file, run_id + "\n")
            self._sent = {}  # a new MLflow run has none of the dropped lines' points
            batch = [Param(k, str(v)[:6000]) for k, v in flatten(params or {}).items()]
            for i in range(0, len(batch), PARAMS_PER_CALL):
                self._submit(lambda c, b: c.log_batch(self.run_id, params=b), batch[i : i + PARAMS_PER_CALL])
        else:
            self.run_id = run_id
            self._submit(lambda c: c.update_run(self.run_id, status="RUNNING"))
        log.info("MLflow run %s in experiment '%s' at %s", run_id, cfg.experiment, uri)

    def _fail(self, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("MLflow unavailable (%s: %s); continuing with %s only", type(exc).__name__, exc,
                        self.run_dir / "metrics.jsonl")
        self._client = None

    def _submit(self, call: Callable[..., Any], *args: Any, calls: int = 1) -> None:
        """Queue `call(client, *args)` for the background thread; count it as dropped when MLflow is
        off after a failure or the queue is full (`calls`: how many calls it stands for)."""
        if not self._mirror:
            return
        with self._lock:
            if self._client is None or self._closed:
                self._dropped += calls
                return
            try:
                self._queue.put_nowait((call, args))
                self._pending += 1
            except queue.Full:
                self._dropped += 1

    # ------------------------------------------------------------ MLflow, on the background thread

    def _drain(self) -> None:
        while True:
            call, args = self._queue.get()
            if call is None:  # close(): everything before it has been sent or counted
                self._finish(*args)
                return
            if self._closed:  # close() gave up waiting and counted the rest as dropped: stop here
                return
            ok = self._client is not None
            if ok:
                try:
                    call(self._client, *args)
                except Exception as exc:  # noqa: BLE001 - any MLflow/network failure, by design
                    self._fail(exc)
                    ok = False
            with self._lock:
                self._pending -= 1
                self._dropped += 0 if ok else 1

    def _finish(self, status: str) -> None:
        client = self._client
        if client is None:
            return
        try:
            if self._dropped and DROPPED_KEY not in self._sent.get(self._last_step, ()):
                from mlflow.entities import Metric

                client.log_batch(self.run_id, metrics=[Metric(DROPPED_KEY, float(self._dropped),
                                                              int(time.time() * 1000), self._last_step)])
            client.set_terminated(self.run_id, status=status)
        except Exception as exc:  # noqa: BLE001
            self._fail(exc)

    # ------------------------------------------------------------ the API

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.is_main:
            return
        clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
        self._jsonl.write(json.dumps({"step": step, "time": round(time.time(), 3), **clean}) + "\n")
        self._last_step = step
        sent = self._sent.get(step)
        if sent:
            clean = {k: v for k, v in clean.items() if k not in sent}
        if not (self._mirror and clean):
            return
        calls = math.ceil(len(clean) / METRICS_PER_CALL)
        if self._client is None:
            self._submit(lambda c: None, calls=calls)  # counted as dropped; no need to build the batch
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(key=k, value=v, timestamp=now, step=step) for k, v in clean.items()]
        for i in range(0, len(batch), METRICS_PER_CALL):
            self._submit(lambda c, b: c.log_batch(self.run_id, metrics=b), batch[i : i + METRICS_PER_CALL])

    def set_tags(self, tags: dict[str, str]) -> None:
        if not (self.is_main and tags):
            return
        if self._client is None:
            self._submit(lambda c: None)  # counted as dropped
            return
        from mlflow.entities import RunTag

        self._submit(lambda c, t: c.log_batch(self.run_id, tags=t), [RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if self.is_main:
            self._submit(lambda c, p, a: c.log_artifact(self.run_id, p, a), str(path), artifact_path)

    @property
    def dropped(self) -> int:
        """MLflow calls so far that did not reach MLflow and never will."""
        with self._lock:
            return self._dropped

    def close(self, status: str = "FINISHED") -> None:
        """Send what is queued (waiting at most CLOSE_WAIT_S), mark the MLflow run `status`, and log
        `tracking/dropped` when some MLflow calls never reached it."""
        if not self.is_main or self._closed:
            return
        if self._thread is not None:
            deadline = time.monotonic() + CLOSE_WAIT_S
            try:
                self._queue.put((None, (status,)), timeout=CLOSE_WAIT_S)
            except queue.Full:
                pass
            self._thread.join(max(0.0, deadline - time.monotonic()))
            if self._thread.is_alive():
                log.warning("MLflow did not take this run's last calls within %.0f s; gave up on them", CLOSE_WAIT_S)
        with self._lock:
            self._closed = True
            unsent = self._dropped + self._pending
        if unsent:
            self._jsonl.write(json.dumps({"step": self._last_step, "time": round(time.time(), 3),
                                          DROPPED_KEY: float(unsent)}) + "\n")
            log.warning("%d MLflow call(s) of run %s never reached MLflow; %s has every metric", unsent,
                        self.run_dir.name, self.run_dir / "metrics.jsonl")
        self._jsonl.close()
