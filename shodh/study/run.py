"""Running the study: every arm x seed as a child run (pretrain, evaluate, gradient probe), then the report.

Layout: the parent run is ROOT/runs/<experiment>/<study.name>/ (study.md, study.json, plots/,
its MLflow run); arm x seed i is the ordinary run ROOT/runs/<experiment>/<name>-<arm>-s<i>/,
tagged `mlflow.parentRunId` = the parent. A child is done when its `study_arm.json` exists; a
relaunch skips done children and resumes unfinished ones from their checkpoints, so the same
command serves a sequential run, a SLURM array (one `--arms A --seed-index i` per task) and a
requeue. The report (`--report-only`, or the end of a sequential run) only reads finished runs.
"""

from __future__ import annotations

import dataclasses
import fcntl
import logging
import time
from pathlib import Path

import yaml

from shodh.config import RunConfig
from shodh.data.loader import read_manifest
from shodh.errors import ShodhError
from shodh.io import read_json, write_json_atomic
from shodh.study import report
from shodh.study.arms import Arm, arm_config, child_dir, child_name, select, study_dir, study_name
from shodh.tracking import Tracker
from shodh.workspace import STUDY_DONE, resolve_tokenizer_id

log = logging.getLogger(__name__)


def open_parent(cfg: RunConfig, root: Path) -> Tracker:
    """The study's parent run (created once; concurrent array tasks serialize on a file lock)."""
    folder = study_dir(cfg, root)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".parent.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        # The parent's params are the study's own; each child run carries its full resolved config.
        return Tracker(cfg.tracking, root, folder, folder.name,
                       params={"profile": cfg.profile, "seed": cfg.seed, "study": dataclasses.asdict(cfg.study)},
                       tags={"model": "study", "study": folder.name,
                             "mix": ",".join(f"{d}:{w:g}" for d, w in cfg.data.weights.items() if w > 0)})


def parent_id(cfg: RunConfig, root: Path) -> str | None:
    path = study_dir(cfg, root) / "mlflow_run_id"
    return path.read_text().strip() if path.is_file() else None


def _resolved(cfg: RunConfig) -> dict:
    return yaml.safe_load(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def run_arm(cfg: RunConfig, root: Path, arm: Arm, seed_index: int, domains: list[str], channels: int,
            batches: dict) -> dict:
    """Train, evaluate and probe one arm x seed (or find it done); returns its study_arm.json."""
    from shodh.distributed import dist_info
    from shodh.eval.callbacks import training_callbacks
    from shodh.eval.evaluate import evaluate
    from shodh.study.conflict import run_conflict
    from shodh.train.trainer import pretrain

    acfg = arm_config(cfg, arm, domains, seed_index)
    name = child_name(cfg, arm.name, seed_index)
    run_dir = child_dir(cfg, root, arm.name, seed_index)
    if (run_dir / "config.yaml").is_file() and yaml.safe_load((run_dir / "config.yaml").read_text()) != _resolved(acfg):
        raise ShodhError(f"{run_dir / 'config.yaml'}: run {name} exists with a different config than this study "
                         f"asks for; pick another study.name or remove that run directory")
    if (run_dir / STUDY_DONE).is_file():
        log.info("study %s: %s done, skipped", study_name(cfg), name)
        return read_json(run_dir / STUDY_DONE, "study arm record")
    t0 = time.perf_counter()
    log.info("study %s: training %s", study_name(cfg), name)
    pretrain(acfg, root, name, dist_info(), training_callbacks(acfg, root))
    evaluate(dataclasses.replace(acfg, eval=dataclasses.replace(acfg.eval, splits=[cfg.study.split])), root,
             str(run_dir))
    conflict = run_conflict(acfg, root, run_dir, channels, batches)
    record = {"arm": arm.name, "seed_index": seed_index, "seed": acfg.seed, "run": name,
              "wall_s": round(time.perf_counter() - t0, 2), "conflict": conflict}
    child = Tracker(acfg.tracking, root, run_dir, name)
    try:
        parent = parent_id(cfg, root)
        child.set_tags({**({"mlflow.parentRunId": parent} if parent else {}), "study": study_name(cfg),
                        "study_arm": arm.name, "study_seed_index": str(seed_index)})
        for point in conflict:
            child.log_metrics({f"conflict/{group}/{key}": value for group, stats in point["groups"].items()
                               for key, value in stats.items()}, point["step"])
    finally:
        child.close()
    write_json_atomic(run_dir / STUDY_DONE, record)
    return record


def run_study(cfg: RunConfig, root: Path, seed_index: int | None = None, report_only: bool = False,
              command: str = "") -> dict | None:
    """Run the selected arms (all seeds, or one seed index) and, unless one seed index was asked
    for, assemble the report. Returns study.json's content, or None for a single launch."""
    from shodh.study.conflict import held_out_batches

    root = Path(root)
    t0 = time.perf_counter()
    tokenizer_id = resolve_tokenizer_id(root, cfg.train.tokenizer_id)
    manifest = read_manifest(root, tokenizer_id, cfg.data.urls)
    domains = list(manifest["domains"])
    arms = select(cfg.study.arms, domains)
    if seed_index is not None and not 0 <= seed_index < cfg.study.seeds:
        raise ShodhError(f"--seed-index {seed_index}: must be in [0, study.seeds={cfg.study.seeds})")
    parent = open_parent(cfg, root)
    if not report_only:
        batches = held_out_batches(cfg, root, tokenizer_id, domains)
        for i in range(cfg.study.seeds) if seed_index is None else [seed_index]:
            for arm in arms:
                run_arm(cfg, root, arm, i, domains, int(manifest["channels"]), batches)
    if seed_index is not None:
        return None
    study = report.assemble(cfg, root, arms, domains, tokenizer_id, command)
    study["wall_s"] = round(time.perf_counter() - t0, 1)
    report.write(study, study_dir(cfg, root), parent)
    return study

