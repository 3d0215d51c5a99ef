"""Leaf: every path and id under the workspace `--root`, and the data contract's fixed numbers.

Layout (DESIGN.md):
    ROOT/raw/<split>/<domain>-<traj:06d>.tar    raw field shards, ROOT/raw/manifest.json
    ROOT/raw/parts/<domain>-<traj:06d>.json     one finished trajectory's manifest entry
    ROOT/raw/imports/<domain>.json              an imported domain's manifest section (shodh import)
    ROOT/tokenizer/                             tokenizer.pt, tokenizer.json, checkpoint.pt
    ROOT/latents/<tokenizer-id>/                latent shards (same split/parts layout), manifest.json
    ROOT/runs/<experiment>/<run>/               one run (pretraining, tokenizer, study parent or child)
    ROOT/mlflow.db, ROOT/mlartifacts/           the embedded MLflow store
No other module builds a path under the root; stages call these functions.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from shodh.errors import ConfigError, ShodhError
from shodh.io import read_json

SPLITS = ("train", "val", "test")  # trajectory splits; a trajectory belongs to exactly one
HELD_OUT = ("val", "test")
LATENT = 16  # latent grid side: every profile encodes fields to [C, 16, 16, 16]
STUDY_DONE = "study_arm.json"  # a finished study child run


def valid_grid(n: int) -> bool:
    """A field grid side the tokenizer can halve down to the LATENT grid: 16·2^k."""
    ratio = n // LATENT
    return n >= LATENT and n % LATENT == 0 and ratio & (ratio - 1) == 0


def ensure_root(root: Path) -> Path:
    """Create the workspace if needed and prove it is writable, before any work starts."""
    root = Path(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ShodhError(f"--root {root}: workspace is not writable ({exc.strerror or exc})") from None
    return root


def readable_root(root: Path) -> Path:
    """An existing workspace that verbs which only read (audit, ui) can use: readable, maybe read-only."""
    root = Path(root)
    if not root.is_dir():
        raise ShodhError(f"--root {root}: no such workspace directory")
    if not os.access(root, os.R_OK | os.X_OK):
        raise ShodhError(f"--root {root}: workspace is not readable")
    return root


def check_name(value: str, field: str) -> str:
    """`value` if it is a plain name, usable as one path component under the root; else a
    ConfigError naming `field`. A '/', '\\', '.', '..', a leading '.' or an unprintable character
    would put the directory elsewhere (`../../x`, `/abs/path`), hide it, or garble it."""
    ok = (isinstance(value, str) and bool(value.strip()) and value.isprintable() and not value.startswith(".")
          and "/" not in value and "\\" not in value)
    if not ok:
        raise ConfigError(f"{field}: {value!r} is not a plain name (one path component: no '/' or '\\', "
                          f"no leading '.', printable, not empty)")
    return value


def lock_file(folder: Path, holder: str) -> Path:
    """The lock file of one writer of `folder` (see shodh.io.RunLock): `<folder>/.lock-<holder>`,
    holder = rank<r> or task<i>, so parallel ranks or array tasks that write disjoint files of one
    folder never block each other, while a second launch of the same job does."""
    return Path(folder) / f".lock-{holder}"


def raw_lock_file(root: Path, task: int) -> Path:
    """Beside ROOT/raw, not in it: `simulate --overwrite` replaces the whole folder."""
    return Path(root) / f".lock-raw-task{task}"


def trajectory_name(domain: str, trajectory: int) -> str:
    """File stem of one trajectory's shard and part record: `<domain>-<traj:06d>`."""
    return f"{domain}-{int(trajectory):06d}"


# ---------------------------------------------------------------- raw fields


def raw_dir(root: Path) -> Path:
    return Path(root) / "raw"


def raw_manifest_path(root: Path) -> Path:
    return raw_dir(root) / "manifest.json"


def spinup_paths(root: Path, domain: str) -> tuple[Path, Path]:
    """(state .npy, record .json) of a domain's cached spin-up."""
    folder = raw_dir(root) / "spinup"
    return folder / f"{domain}.npy", folder / f"{domain}.json"


def shard_file(folder: Path, split: str, domain: str, trajectory: int) -> Path:
    """`<folder>/<split>/<domain>-<traj>.tar`: the shard layout of raw and latent folders alike."""
    return Path(folder) / split / f"{trajectory_name(domain, trajectory)}.tar"


def part_file(folder: Path, domain: str, trajectory: int) -> Path:
    """`<folder>/parts/<domain>-<traj>.json`: a finished trajectory's manifest record."""
    return Path(folder) / "parts" / f"{trajectory_name(domain, trajectory)}.json"


def import_section_file(root: Path, domain: str) -> Path:
    """ROOT/raw/imports/<domain>.json: an imported domain's shards, counts, statistics and provenance,
    folded into raw/manifest.json beside the simulated domains."""
    return raw_dir(root) / "imports" / f"{check_name(domain, '--domain')}.json"


def import_section_files(root: Path) -> list[Path]:
    return sorted((raw_dir(root) / "imports").glob("*.json"))


def import_lock_file(root: Path, domain: str) -> Path:
    return Path(root) / f".lock-import-{check_name(domain, '--domain')}"


# ---------------------------------------------------------------- tokenizer and latents


def tokenizer_dir(root_or_dir: str | Path) -> Path:
    """ROOT/tokenizer, or the directory itself when it already holds tokenizer.json."""
    path = Path(root_or_dir)
    return path if (path / "tokenizer.json").exists() else path / "tokenizer"


def resolve_tokenizer_id(root: Path, configured: str = "") -> str:
    """The configured tokenizer id (`train.tokenizer_id`), else the one in ROOT/tokenizer/tokenizer.json."""
    if configured:
        return configured
    path = Path(root) / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise ShodhError(f"{path}: no tokenizer; run `shodh train-tokenizer` first or set train.tokenizer_id")
    tid = read_json(path, "tokenizer metadata").get("id")
    if not tid:
        raise ShodhError(f"{path}: has no 'id'")
    return str(tid)


def latent_dir(root: Path, tokenizer_id: str) -> Path:
    """ROOT/latents/<tokenizer-id>: where `encode` writes the latent shards and their manifest."""
    return Path(root) / "latents" / tokenizer_id


# ---------------------------------------------------------------- runs and tracking


def runs_dir(root: Path, experiment: str) -> Path:
    return Path(root) / "runs" / check_name(experiment, "tracking.experiment")


def run_dir(root: Path, experiment: str, name: str, field: str = "--run-name") -> Path:
    """ROOT/runs/<experiment>/<name>; `name` must be a plain name (`field` names it in the error)."""
    return runs_dir(root, experiment) / check_name(name, field)


def resolve_run_dir(run: str, root: Path, experiment: str) -> Path:
    """--run is a run directory, or a run name under ROOT/runs/<experiment>/."""
    candidates = [Path(run)]
    try:
        candidates.append(run_dir(root, experiment, run, "--run"))
    except ConfigError:
        pass  # a path, not a name: only the directory itself
    for candidate in candidates:
        if (candidate / "config.yaml").is_file():
            return candidate
    raise ShodhError(f"--run {run}: no run directory with a config.yaml there nor under "
                     f"{runs_dir(root, experiment)}; pass the directory `shodh pretrain` printed")


def study_child_name(study: str, arm: str, seed_index: int) -> str:
    """Run name of one study arm x seed: `<study>-<arm>-s<i>`, a sibling of the study's own run."""
    return f"{study}-{arm}-s{seed_index}"


def mlflow_store(root: Path) -> str:
    """The embedded MLflow store's URI, `sqlite:///ROOT/mlflow.db`."""
    return f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def mlflow_artifacts(root: Path) -> Path:
    return Path(root).resolve() / "mlartifacts"
