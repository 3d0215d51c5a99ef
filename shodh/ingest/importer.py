"""`shodh import`: foreign velocity data -> raw field shards, checked the way a divergence-free
tokenizer needs it.

Per file: the structure is checked (sources.py), every axis is made periodic (boundaries.py), the
grid must then be the workspace's cube N = 16·2^k (or is spectrally resampled on request,
`--resample N`, never silently). Per frame: NaN/inf are refused, and the divergence is measured
with the tokenizer's own operator (`tokenizer.operator`, the `shodh audit` pair). The decoder
returns curl A + mean flow, so it can only represent the solenoidal part of a field: the size of
the rest, rms(u - P u) / rms(u - mean u) with P the projection matching that operator, is what
the tokenizer would lose. Above `--max-nonsolenoidal` the import refuses, unless `--project`,
which stores P u and records what it removed per frame.

Output (DESIGN.md's raw contract): `ROOT/raw/<split>/<domain>-<traj:06d>.tar`, one shard per
trajectory; per frame `u.npy` float32 [3, N, N, N], `mask.npy` uint8 [N, N, N] and `meta.json`
with `"source": "import"` and the provenance (file, dataset, trajectory in the file, time,
boundaries and what was done to them, divergence, projection, resampling). The domain's manifest
section `ROOT/raw/imports/<domain>.json` (shards, counts, train statistics) is folded into
`ROOT/raw/manifest.json` beside the simulated domains (`shodh.io.fold_sections`), so later stages
see one workspace. Splits are by trajectory: the file's own split (The Well's data/train|valid|test
folders) when it has one, else the last tenth of the trajectories (at least one) is test and the
tenth before it val, or all go where `--split` says.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from shodh.errors import DataError, ShodhError, check
from shodh.fields.spectral import divergence_stats, resample, resample_mask, solenoidal
from shodh.ingest import boundaries as bc
from shodh.ingest.sources import BOUNDARY_TYPES, Source, open_array, open_well
from shodh.io import AtomicShardWriter, RunLock, fold_sections, moments, read_json, split_counts, write_json_atomic
from shodh.workspace import (
    LATENT,
    SPLITS,
    check_name,
    import_lock_file,
    import_section_file,
    import_section_files,
    raw_dir,
    raw_manifest_path,
    shard_file,
    valid_grid,
)

log = logging.getLogger(__name__)

SECTION_FORMAT = "shodh-import-1"
MANIFEST_FORMAT = "shodh-raw-1"  # the simulator's format: an imported-only workspace has the same manifest


@dataclass
class ImportOptions:
    """What `shodh import` does; the CLI options map one to one (see `shodh import --help`)."""

    format: Literal["well", "npy", "hdf5"]
    paths: list[Path]
    domain: str
    field: str = "velocity"  # Well: t1_fields/<field>
    split: Literal["train", "val", "test", "auto"] = "auto"
    walls: Literal["mirror", "solid"] = "mirror"
    allow_open: bool = False
    max_nonsolenoidal: float = 0.01  # refuse frames whose non-solenoidal part exceeds this fraction of the fluctuation
    project: bool = False
    resample: int | None = None
    dataset: str = "velocity"  # hdf5 arrays: the dataset name
    channels_last: bool = False  # npy / hdf5 arrays: [T, X, Y, Z, 3] instead of [T, 3, X, Y, Z]
    dt: float | None = None  # npy / hdf5 arrays: time between frames (hdf5: else the dataset's `dt` attribute)
    boundaries: list[str] = dataclasses.field(default_factory=lambda: ["periodic"] * 3)  # npy / hdf5 arrays, per axis
    mask: Path | None = None  # npy / hdf5 arrays: solid mask [X, Y, Z] .npy

    def validate(self) -> None:
        check_name(self.domain, "--domain")
        check(len(self.paths) >= 1, "PATH", "give at least one file")
        check(self.max_nonsolenoidal > 0, "--max-nonsolenoidal", f"must be > 0, got {self.max_nonsolenoidal}")
        check(len(self.boundaries) == 3 and all(b in BOUNDARY_TYPES for b in self.boundaries), "--boundaries",
              f"must be three of {', '.join(BOUNDARY_TYPES)} (x,y,z), got {','.join(self.boundaries)}")
        check(self.resample is None or valid_grid(self.resample), "--resample",
              f"must be {LATENT} times a power of two, got {self.resample}")
        check(self.dt is None or self.dt > 0, "--dt", f"must be > 0, got {self.dt}")


@dataclass
class Plan:
    """One source trajectory's destination."""

    source: Source
    in_file: int  # trajectory index inside the file
    index: int  # shodh trajectory id of the domain
    split: str


def _open(opts: ImportOptions, path: Path) -> Source:
    if opts.format == "well":
        return open_well(path, opts.field)
    return open_array(path, opts.format, opts.dataset, opts.channels_last, opts.dt, tuple(opts.boundaries), opts.mask)


def _periodic_sides(src: Source, opts: ImportOptions) -> tuple[int, int, int]:
    sides = src.sides
    if opts.walls == "solid":
        return tuple(max(sides) if kind == "wall" else n for kind, n in zip(src.boundaries, sides))
    return tuple(2 * n if kind == "wall" else n for kind, n in zip(src.boundaries, sides))


def check_grid(src: Source, opts: ImportOptions, workspace_grid: int | None) -> tuple[int, list[str]]:
    """(the stored cube side N, the per-axis boundary treatment), or a refusal naming the file."""
    where = f"{src.path}: dataset '{src.dataset}'"
    treatment = bc.plan(src.boundaries, src.sides, opts.walls, opts.allow_open, where)
    sides = _periodic_sides(src, opts)
    if src.spacing is not None:
        spacing = [abs(d) for d in src.spacing]
        if max(spacing) > min(spacing) * (1 + 1e-3):
            raise DataError(f"{where}: grid spacing differs between axes ({', '.join(f'{d:.4g}' for d in spacing)}); "
                            f"the tokenizer's operators assume a cubic cell")
    target = opts.resample or workspace_grid or sides[0]
    if opts.resample is None:
        if len(set(sides)) != 1 or not valid_grid(sides[0]):
            raise DataError(f"{where}: grid {'x'.join(map(str, src.sides))} is {'x'.join(map(str, sides))} once periodic, "
                            f"not a cube of side {LATENT}·2^k; pass --resample N to resample it spectrally (it is "
                            f"never done silently)")
        if workspace_grid is not None and sides[0] != workspace_grid:
            raise DataError(f"{where}: grid {sides[0]}^3 differs from the workspace's {workspace_grid}^3 "
                            f"(raw/manifest.json); pass --resample {workspace_grid}")
    elif len(set(sides)) != 1:
        raise DataError(f"{where}: grid {'x'.join(map(str, sides))} once periodic is not a cube; resampling it to "
                        f"{target}^3 would stretch one axis (cropping is not supported)")
    elif workspace_grid is not None and target != workspace_grid:
        raise DataError(f"{where}: --resample {target} differs from the workspace's grid {workspace_grid}")
    return target, treatment


def assign_splits(sources: list[Source], opts: ImportOptions) -> list[Plan]:
    """Every source trajectory with its shodh id and split (see the module docstring)."""
    plans = []
    for src in sources:
        for i in range(src.trajectories):
            split = opts.split if opts.split != "auto" else src.split
            plans.append(Plan(src, i, len(plans), split))
    free = [p for p in plans if p.split is None]
    held = max(1, len(free) // 10) if len(free) >= 3 else 0
    for k, p in enumerate(free):
        p.split = "test" if k >= len(free) - held else "val" if k >= len(free) - 2 * held else "train"
    if not any(p.split == "train" for p in plans):
        raise DataError(f"--domain {opts.domain}: no trajectory falls in the train split (the normalization statistics "
                        f"come from it); import train data too or pass --split train")
    return plans


def convert(u_CXYZ: np.ndarray, mask_XYZ: np.ndarray, src: Source, opts: ImportOptions, grid: int,
            operator: str, where: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """One frame -> (u float32 [3, N, N, N], mask uint8 [N, N, N], its divergence record), or a refusal."""
    u_CXYZ, mask_XYZ = bc.make_periodic(u_CXYZ, mask_XYZ, src.boundaries, opts.walls)
    u = torch.from_numpy(np.ascontiguousarray(u_CXYZ))
    if u.shape[-1] != grid or len(set(u.shape[1:])) != 1:
        u = resample(u, grid)
        mask_XYZ = resample_mask(torch.from_numpy(np.ascontiguousarray(mask_XYZ)), grid).numpy().astype(np.uint8)
    stats = divergence_stats(u[None], operator)
    sol = solenoidal(u, operator)
    fluct = float((u - u.mean(dim=(-3, -2, -1), keepdim=True)).pow(2).mean().sqrt())
    lost = float((u - sol).pow(2).mean().sqrt()) / max(fluct, 1e-300)
    record = {"operator": operator, "rel_max": stats["rel_max"], "rel_rms": stats["rel_rms"], "nonsolenoidal": lost}
    if lost > opts.max_nonsolenoidal:
        if not opts.project:
            raise DataError(
                f"{where}: divergence rel_rms {stats['rel_rms']:.3g} (rel_max {stats['rel_max']:.3g}, {operator} operator): "
                f"the non-solenoidal part is {lost:.2%} of the velocity fluctuation (rms), above --max-nonsolenoidal "
                f"{opts.max_nonsolenoidal:g}; a divergence-free decoder (curl A + mean) cannot represent it, so the "
                f"tokenizer would lose it (a reconstruction floor near VRMSE {lost:.3f}). Pass --project to remove "
                f"that part (its size is recorded per frame)")
    if opts.project:
        u = sol
        record["projected"] = True
        after = divergence_stats(u[None], operator)
        record.update(rel_max_after=after["rel_max"], rel_rms_after=after["rel_rms"])
    return u.to(torch.float32).numpy(), mask_XYZ.astype(np.uint8), record


def run_import(opts: ImportOptions, root: Path, operator: str) -> dict:
    """Import every file of `opts` as domain `opts.domain`; returns the new raw manifest."""
    opts.validate()
    root = Path(root)
    with RunLock(import_lock_file(root, opts.domain), f"import of domain '{opts.domain}'"):
        return _run(opts, root, operator)


def _base_manifest(root: Path, domain: str) -> dict | None:
    """The workspace's manifest without its imported domains (they are folded in again), or None."""
    path = raw_manifest_path(root)
    if not path.exists():
        return None
    manifest = read_json(path, "raw manifest")
    imported = set(manifest.get("imported", []))
    if domain in manifest.get("domains", []) and domain not in imported:
        raise ShodhError(f"--domain {domain}: {path} already has a simulated domain '{domain}'; import under another name")
    return {**manifest, "domains": [d for d in manifest["domains"] if d not in imported],
            "shards": [s for s in manifest["shards"] if s["domain"] not in imported],
            "counts": {s: {d: c for d, c in per.items() if d not in imported} for s, per in manifest["counts"].items()},
            "stats": {d: v for d, v in manifest["stats"].items() if d not in imported}}


def _run(opts: ImportOptions, root: Path, operator: str) -> dict:
    t_start = time.perf_counter()
    base = _base_manifest(root, opts.domain)
    sources = [_open(opts, Path(p)) for p in opts.paths]
    try:
        grid = None
        for src in sources:
            grid = grid or check_grid(src, opts, base["grid"] if base else grid)[0]
        plans = assign_splits(sources, opts)
        records = _write_shards(plans, opts, root, grid, operator)
    finally:
        for src in sources:
            src.close()
    section_path = import_section_file(root, opts.domain)
    old = read_json(section_path, "import section") if section_path.exists() else None
    keep = ("path", "split", "domain", "trajectory", "samples", "sha256", "source_file", "source_trajectory")
    section = {
        "format": SECTION_FORMAT, "domain": opts.domain, "grid": grid,
        "shards": [{k: r[k] for k in keep} for r in records],
        "counts": {s: c[opts.domain] for s, c in split_counts(records, SPLITS, [opts.domain]).items()},
        "stats": {**moments([r for r in records if r["split"] == "train"]), "split": "train"},
        "provenance": {"format": opts.format, "files": [str(Path(p).resolve()) for p in opts.paths],
                       "field": opts.field if opts.format == "well" else opts.dataset, "walls": opts.walls,
                       "allow_open": opts.allow_open, "project": opts.project, "resample": opts.resample,
                       "max_nonsolenoidal": opts.max_nonsolenoidal, "operator": operator,
                       "nonsolenoidal_max": max(r["nonsolenoidal_max"] for r in records),
                       "wall_s": round(time.perf_counter() - t_start, 3)},
    }
    write_json_atomic(section_path, section)
    if old:  # a re-import with fewer trajectories leaves no orphan shards behind
        current = {s["path"] for s in section["shards"]}
        for entry in old["shards"]:
            if entry["path"] not in current:
                (raw_dir(root) / entry["path"]).unlink(missing_ok=True)
    if base is None:
        base = {"format": MANIFEST_FORMAT, "config_sha": None, "grid": grid, "domains": [], "shards": [],
                "counts": {s: {} for s in SPLITS}, "stats": {}}
    manifest = fold_sections(base, [read_json(p, "import section") for p in import_section_files(root)])
    write_json_atomic(raw_manifest_path(root), manifest)
    log.info("imported %d trajectories of %s in %.1f s", len(records), opts.domain, time.perf_counter() - t_start)
    return manifest


def _write_shards(plans: list[Plan], opts: ImportOptions, root: Path, grid: int,
                  operator: str) -> list[dict]:
    records, written = [], []
    total = sum(len(p.source.times_T[min(p.in_file, len(p.source.times_T) - 1)]) for p in plans)
    try:
        with tqdm(total=total, desc=f"import {opts.domain} -> {grid}^3", unit="frame") as bar:
            for plan in plans:
                records.append(_write_one(plan, opts, root, grid, operator, bar))
                written.append(shard_file(raw_dir(root), plan.split, opts.domain, plan.index))
    except BaseException:
        for path in written:  # an import is all or nothing: no shard without its manifest entry
            path.unlink(missing_ok=True)
        raise
    return records


def _write_one(plan: Plan, opts: ImportOptions, root: Path, grid: int,
               operator: str, bar: tqdm) -> dict:
    src = plan.source
    times = src.times_T[min(plan.in_file, len(src.times_T) - 1)]
    sums = np.zeros((2, 3))
    worst = 0.0
    path = shard_file(raw_dir(root), plan.split, opts.domain, plan.index)
    stat = os.stat(src.path)
    mask0 = src.mask_XYZ if src.mask_XYZ is not None else np.zeros(src.sides, np.uint8)
    periodic = _periodic_sides(src, opts)
    treatment = dict(zip("xyz", bc.plan(src.boundaries, src.sides, opts.walls, opts.allow_open, str(src.path))))
    resampled = None if periodic == (grid,) * 3 else f"spectral {'x'.join(map(str, periodic))} -> {grid}^3"
    with AtomicShardWriter(path) as writer:
        for t in range(len(times)):
            where = f"{src.path}: dataset '{src.dataset}', trajectory {plan.in_file}, frame {t}"
            u, mask, div = convert(src.frame(plan.in_file, t), mask0, src, opts, grid, operator, where)
            worst = max(worst, div["nonsolenoidal"])
            u64 = u.astype(np.float64).reshape(3, -1)
            sums += np.stack([u64.sum(1), (u64**2).sum(1)])
            dt = float(times[1] - times[0]) if len(times) > 1 else 0.0
            meta = {
                "domain": opts.domain, "trajectory": plan.index, "t": float(times[t]), "frame": t, "dt": dt,
                "grid": grid, "split": plan.split, "source": "import", "source_format": opts.format,
                "source_file": str(src.path.resolve()), "source_size": stat.st_size, "source_mtime": stat.st_mtime,
                "dataset_name": src.dataset_name, "dataset": src.dataset, "source_trajectory": plan.in_file,
                "boundaries": dict(zip("xyz", src.boundaries)), "source_grid": list(src.sides),
                "boundary_treatment": treatment, "resampled": resampled,
                "divergence": div,
            }
            writer.write(f"{opts.domain}_{plan.index:05d}_{t:05d}", {"u.npy": u, "mask.npy": mask, "meta.json": meta})
            bar.update(1)
    return {"path": str(path.relative_to(raw_dir(root))), "split": plan.split, "domain": opts.domain,
            "trajectory": plan.index, "samples": writer.count, "sha256": writer.sha256, "voxels": grid**3 * writer.count,
            "sum": sums[0].tolist(), "sumsq": sums[1].tolist(), "source_file": str(src.path.resolve()),
            "source_trajectory": plan.in_file, "nonsolenoidal_max": worst}
