"""The `simulate` stage: run both domains and write raw field shards plus a manifest.

Layout (DESIGN.md): `ROOT/raw/<split>/<domain>-<trajectory:06d>.tar`, one shard per trajectory,
one sample per frame with `u.npy` float32 [3, N, N, N], `mask.npy` uint8 [N, N, N] and
`meta.json`; `ROOT/raw/manifest.json` lists shards, counts, sha256 and per-domain normalization
statistics (train split only). Each finished trajectory also leaves `raw/parts/<domain>-<id>.json`
(its manifest entry): reruns skip those trajectories, and parallel workers (data_pipeline/)
write parts that one merge turns into the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from tqdm import tqdm

from shodh.errors import ConfigError, DataError, ShodhError, check
from shodh.fields.spectral import SpectralGrid, resample
from shodh.io import (
    AtomicShardWriter,
    RunLock,
    collect_parts,
    fold_sections,
    moments,
    read_json,
    remove_stale_temporaries,
    sha256_file,
    sha256_json,
    split_counts,
    write_atomic,
    write_json_atomic,
)
from shodh.physics import domains as physics_domains
from shodh.physics import validation as physics_validation
from shodh.physics.domains import ChannelConfig, PorousConfig
from shodh.physics.solver import NavierStokes
from shodh.workspace import (
    LATENT,
    SPLITS,
    import_section_files,
    part_file,
    raw_dir,
    raw_lock_file,
    raw_manifest_path,
    shard_file,
    spinup_paths,
    trajectory_name,
    valid_grid,
)

log = logging.getLogger(__name__)

SOLVER_VERSION = "shodh-ns-2 (pseudo-spectral, IF-Heun-RK3, 2/3 dealiasing, implicit projected Brinkman)"
MANIFEST_FORMAT = "shodh-raw-1"
DOMAIN_CODES = {"channel": 1, "porous": 2}  # stable seeds, independent of list order
Domain = Literal["channel", "porous"]


@dataclass
class SplitCounts:
    """Trajectories per domain in each split (splits never share a trajectory)."""

    train: int = 4
    val: int = 1
    test: int = 1

    def validate(self) -> None:
        check(self.train >= 1, "train", f"must be >= 1, got {self.train}")
        check(self.val >= 0 and self.test >= 0, "val", "val and test must be >= 0")


@dataclass
class SimConfig:
    grid: int = 32  # N: fields are [3, N, N, N]
    domains: list[Domain] = field(default_factory=lambda: ["channel", "porous"])
    trajectories: SplitCounts = field(default_factory=SplitCounts)
    frames: int = 8  # stored frames per trajectory
    cfl: float = 0.5
    eta: float = 1e-3  # Brinkman penalization time scale
    dtype: Literal["float32", "float64"] = "float32"
    device: str = "cpu"  # execution only: not part of the data's identity
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    channel: ChannelConfig = field(default_factory=ChannelConfig)
    porous: PorousConfig = field(default_factory=PorousConfig)

    def validate(self) -> None:
        check(valid_grid(self.grid), "grid",
              f"must be {LATENT} times a power of two ({', '.join(str(LATENT * 2**i) for i in range(4))}, ...) so the "
              f"tokenizer reaches {LATENT}^3, got {self.grid}")
        check(len(self.domains) >= 1 and len(set(self.domains)) == len(self.domains), "domains",
              f"must list distinct domains, got {self.domains}")
        check(self.frames >= 2, "frames", f"must be >= 2 (training needs consecutive frames), got {self.frames}")
        check(0 < self.cfl <= 1.0, "cfl", f"must be in (0, 1], got {self.cfl}")
        check(self.eta > 0, "eta", f"must be > 0, got {self.eta}")
        check(self.threads >= 0, "threads", f"must be >= 0, got {self.threads}")


@dataclass(frozen=True)
class Trajectory:
    domain: str
    index: int  # per-domain id, unique across splits
    split: str
    seed: int

    @property
    def name(self) -> str:
        return trajectory_name(self.domain, self.index)


def data_identity(sim: SimConfig, seed: int) -> dict:
    """What determines the data: the sim config without execution settings, plus seed and solver."""
    cfg = dataclasses.asdict(sim)
    for key in ("device", "threads"):
        cfg.pop(key)
    return {"sim": cfg, "seed": seed, "solver": SOLVER_VERSION}


def check_solver(manifest: dict, path: Path, remedy: str) -> None:
    """Refuse simulated data made by another solver version (imported data carry none)."""
    generator = manifest.get("generator")
    if not isinstance(generator, dict) or "solver" not in generator:
        return
    if generator["solver"] != SOLVER_VERSION:
        raise DataError(f"{path}: raw data written by solver '{generator['solver']}'; this shodh's solver is "
                        f"'{SOLVER_VERSION}' and does not mix their fields; {remedy}")


def plan(sim: SimConfig, seed: int) -> list[Trajectory]:
    out = []
    for domain in sim.domains:
        index = 0
        for split in SPLITS:
            for _ in range(getattr(sim.trajectories, split)):
                state = np.random.SeedSequence([seed, DOMAIN_CODES[domain], index]).generate_state(1)[0]
                out.append(Trajectory(domain, index, split, int(state)))
                index += 1
    return out


def shard_path(root: Path, traj: Trajectory) -> Path:
    return shard_file(raw_dir(root), traj.split, traj.domain, traj.index)


def part_path(root: Path, traj: Trajectory) -> Path:
    return part_file(raw_dir(root), traj.domain, traj.index)


def _torch_dtype(sim: SimConfig) -> torch.dtype:
    return torch.float64 if sim.dtype == "float64" else torch.float32


def _grid(sim: SimConfig) -> SpectralGrid:
    return SpectralGrid(sim.grid, dtype=_torch_dtype(sim), device=sim.device)


# ---------------------------------------------------------------- workspace checks


def check_workspace(sim: SimConfig, seed: int, root: Path, overwrite: bool) -> str:
    """Refuse raw data made by another config (unless overwrite, which removes it). Returns sha."""
    sha = sha256_json(data_identity(sim, seed))
    raw = raw_dir(root)
    if not raw.exists():
        return sha
    found = []
    manifest = raw_manifest_path(root)
    if manifest.exists():
        record = read_json(manifest, "raw manifest")
        check_solver(record, manifest, remedy=f"rerun with --overwrite to replace {raw}, or pick another --root")
        found.append((manifest, record.get("config_sha")))
    found += [(p, read_json(p, "trajectory record").get("config_sha")) for p in sorted((raw / "parts").glob("*.json"))]
    spin = spinup_paths(root, "channel")[1]
    if spin.exists():
        found.append((spin, read_json(spin, "spin-up record").get("config_sha")))
    stale = [(p, other) for p, other in found if other != sha]
    if stale and not overwrite:
        path, other = stale[0]
        raise ShodhError(
            f"{path}: written by another simulation config (config_sha {other}, now {sha}); "
            f"rerun with --overwrite to replace {raw}, or pick another --root"
        )
    if stale:
        log.warning("--overwrite: removing %s (made by config %s)", raw, stale[0][1])
        shutil.rmtree(raw)
    return sha


# ---------------------------------------------------------------- generation


def channel_spinup(sim: SimConfig, seed: int, root: Path, sha: str) -> np.ndarray:
    """The one turbulent state all channel trajectories branch from (cached under raw/spinup/).

    Two phases: `spinup_time` on the coarse `spinup_grid` (cheap: the turbulence grows and the
    bulk flow settles), then `settle_time` on the grid the frames are stored on, where the
    near-wall flow adjusts to the resolution. The settle phase records the bulk velocity, the
    wall stress and the mean profile (`physics.validation.channel_statistics`) into
    raw/spinup/channel.json: the evidence that frames start from a statistically stationary
    flow, and the numbers `benchmarks/physics_report.py` compares with the law of the wall.
    """
    cache, record = spinup_paths(root, "channel")
    if cache.exists() and record.exists() and read_json(record).get("config_sha") == sha:
        return np.load(cache, allow_pickle=False)
    cfg = sim.channel
    t0 = time.perf_counter()
    fmt = "{desc}: {percentage:3.0f}%|{bar}| t={n:.1f}/{total:.1f} [{elapsed}<{remaining}]"
    code = np.random.SeedSequence([seed, DOMAIN_CODES["channel"], 999_999]).generate_state(1)[0]
    coarse = SpectralGrid(min(sim.grid, cfg.spinup_grid), dtype=_torch_dtype(sim), device=sim.device)
    solver, geo = physics_domains.channel_solver(cfg, coarse, sim.eta)
    solver.set_velocity(physics_domains.channel_initial(cfg, coarse, geo, int(code)))
    with tqdm(total=cfg.spinup_time, desc=f"channel spin-up {coarse.n}^3", bar_format=fmt, leave=False) as bar:
        steps = _advance(solver, cfg.spinup_time, sim.cfl, cfg.max_dt, lambda st: bar.update(st.dt), "channel spin-up")
    coarse_record = {"grid": coarse.n, "time": cfg.spinup_time, "steps": steps,
                     "wall_s": round(time.perf_counter() - t0, 2)}
    t1 = time.perf_counter()
    grid = _grid(sim)
    fine, geo = physics_domains.channel_solver(cfg, grid, sim.eta)
    fine.set_velocity(resample(solver.velocity(), sim.grid))
    with tqdm(total=cfg.settle_time, desc=f"channel settle {grid.n}^3", bar_format=fmt, leave=False) as bar:
        try:
            settle = physics_validation.channel_statistics(fine, cfg, geo, cfg.settle_time, sim.cfl, cfg.max_dt,
                                                           on_step=lambda st: bar.update(st.dt))
        except FloatingPointError as exc:
            raise ShodhError(f"channel settle: {exc}") from None
    settle["wall_s"] = round(time.perf_counter() - t1, 2)
    state = fine.velocity().cpu().numpy()

    def save(tmp: Path) -> None:
        with open(tmp, "wb") as f:  # a file object: np.save would append ".npy" to the temporary name
            np.save(f, state, allow_pickle=False)

    write_atomic(cache, save)
    write_json_atomic(record, {"config_sha": sha, "solver": SOLVER_VERSION, "coarse": coarse_record, "settle": settle})
    log.info("channel spin-up: %d + %d steps, %.1f s; over the last %.1f time units U_b+ = %.2f (drift %+.2f %%), "
             "wall stress %.3f u_tau^2", steps, settle["steps"], time.perf_counter() - t0, settle["window"],
             settle["ub_plus"], 100 * settle["ub_drift"], settle["wall_stress_plus"])
    return state


def _advance(solver: NavierStokes, duration: float, cfl: float, max_dt: float, on_step, what: str) -> int:
    try:
        return solver.advance(duration, cfl, max_dt, on_step)
    except FloatingPointError as exc:
        raise ShodhError(f"{what}: {exc}") from None


def _build(sim: SimConfig, traj: Trajectory, spinup: np.ndarray | None):
    """Solver ready to record frame 0, and the trajectory's static metadata."""
    grid = _grid(sim)
    rng = np.random.default_rng(traj.seed)
    gen = torch.Generator().manual_seed(traj.seed % (1 << 63))
    what = f"{traj.domain} trajectory {traj.index}"
    if traj.domain == "channel":
        cfg = sim.channel
        solver, geo = physics_domains.channel_solver(cfg, grid, sim.eta)
        noise = grid.random_solenoidal(kmax=grid.n / 3, rms=cfg.perturbation * physics_domains.bulk_velocity(cfg), generator=gen)
        solver.set_velocity(torch.from_numpy(spinup).to(grid.device, grid.dtype) + noise * (1 - geo["chi"]))
        _advance(solver, cfg.decorrelation_time, sim.cfl, cfg.max_dt, None, what)
        extra = {"re_tau": cfg.re_tau, "u_tau": cfg.u_tau, "wall_height": geo["half_wall"], "channel_height": geo["height"]}
        return solver, geo["chi"], cfg.frame_interval, cfg.max_dt, extra
    cfg = sim.porous
    geo = physics_domains.sphere_packing(cfg, grid, rng)
    forcing = physics_domains.porous_forcing(cfg, phase=float(rng.uniform(0, 2 * math.pi)))
    solver = NavierStokes(grid, cfg.nu, forcing, chi_XYZ=geo["chi"], eta=sim.eta)
    _advance(solver, cfg.spinup_time, sim.cfl, cfg.max_dt, None, what)
    extra = {"porosity": geo["porosity"], "porosity_target": geo["target"], "spheres": len(geo["radii"])}
    return solver, geo["chi"], cfg.frame_interval, cfg.max_dt, extra


def generate_trajectory(sim: SimConfig, traj: Trajectory, root: Path, sha: str,
                        spinup: np.ndarray | None, bar: tqdm | None = None) -> dict:
    """Simulate one trajectory into its shard; returns (and writes) its manifest record."""
    t0 = time.perf_counter()
    solver, chi, interval, max_dt, extra = _build(sim, traj, spinup)
    nu = solver.nu
    mask = (chi > 0.5).cpu().numpy().astype(np.uint8)
    sums = np.zeros((2, 3), dtype=np.float64)  # per component: sum, sum of squares
    path = shard_path(root, traj)
    with AtomicShardWriter(path) as writer:
        for frame in range(sim.frames):
            if frame:
                _advance(solver, interval, sim.cfl, max_dt, None, f"{traj.domain} trajectory {traj.index}")
            u = solver.velocity().to(torch.float32).cpu().numpy()
            u64 = u.astype(np.float64).reshape(3, -1)
            sums += np.stack([u64.sum(1), (u64**2).sum(1)])
            meta = {
                "domain": traj.domain, "trajectory": traj.index, "t": round(solver.t, 9), "frame": frame,
                "dt": interval, "grid": sim.grid, "nu": nu, "split": traj.split,
                "forcing": [float(v) for v in solver.forcing(solver.t)], "solver": SOLVER_VERSION, **extra,
            }
            writer.write(f"{traj.domain}_{traj.index:05d}_{frame:05d}", {"u.npy": u, "mask.npy": mask, "meta.json": meta})
            if bar is not None:
                bar.update(1)
    record = {
        "config_sha": sha, "path": str(path.relative_to(raw_dir(root))), "split": traj.split,
        "domain": traj.domain, "trajectory": traj.index, "samples": writer.count, "sha256": writer.sha256,
        "voxels": int(u64.shape[1]) * writer.count, "sum": sums[0].tolist(), "sumsq": sums[1].tolist(),
        "wall_s": round(time.perf_counter() - t0, 3), "cg_iterations": solver.cg_iterations, **extra,
    }
    write_json_atomic(part_path(root, traj), record)
    return record


def is_complete(root: Path, traj: Trajectory, sha: str) -> bool:
    part, shard = part_path(root, traj), shard_path(root, traj)
    if not (part.exists() and shard.exists()):
        return False
    record = read_json(part, "trajectory record")
    if record.get("config_sha") != sha or record.get("sha256") != sha256_file(shard):
        log.warning("%s: checksum or config differs from %s; regenerating", shard, part)
        return False
    return True


def run(sim: SimConfig, seed: int, root: Path, overwrite: bool = False,
        task_index: int = 0, num_tasks: int = 1, merge: bool = True) -> dict | None:
    """Generate this task's share of trajectories (round-robin), then merge the manifest."""
    check_memory(sim)
    with RunLock(raw_lock_file(root, task_index), f"raw data generation (task {task_index})"):
        return _run(sim, seed, Path(root), overwrite, task_index, num_tasks, merge)


# Peak solver memory in N^3 arrays of sim.dtype, measured (ru_maxrss growth over three steps after
# the grid was built, float32): channel 73 / porous 77 at 64^3, 64 / 59 at 128^3 (state, RK stages,
# their nonlinear terms, the penalization solve's vectors, FFT work buffers); the grid's own
# arrays (points, wavenumbers, masks) add about 7.
SOLVER_FIELDS = 85


def available_memory(device: str) -> int | None:
    """Bytes this process can still allocate on `device` (None when unknown)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.mem_get_info(torch.device(device))[0]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(sim: SimConfig) -> None:
    """Refuse a grid whose solver cannot fit in memory before anything is allocated."""
    need = SOLVER_FIELDS * sim.grid**3 * (8 if sim.dtype == "float64" else 4)
    have = available_memory(sim.device)
    if have is not None and need > have:
        raise ConfigError(f"sim.grid: {sim.grid}^3 in {sim.dtype} needs about {need / 2**30:.1f} GiB for the solver "
                          f"({SOLVER_FIELDS} fields of N^3), {sim.device} has {have / 2**30:.1f} GiB available; "
                          f"lower sim.grid or use a bigger machine")


def _run(sim: SimConfig, seed: int, root: Path, overwrite: bool, task_index: int, num_tasks: int,
         merge: bool) -> dict | None:
    if sim.threads:
        torch.set_num_threads(sim.threads)
    sha = check_workspace(sim, seed, root, overwrite)
    trajectories = plan(sim, seed)
    mine = [t for i, t in enumerate(trajectories) if i % num_tasks == task_index]
    # A killed simulate leaves `<file>.tmp-<pid>`; only this task writes its trajectories' files
    # (and a lone task every file), so it alone clears their debris.
    shared = [raw_manifest_path(root), *spinup_paths(root, "channel")] if num_tasks == 1 else []
    remove_stale_temporaries([p for t in mine for p in (shard_path(root, t), part_path(root, t))] + shared)
    todo = [t for t in mine if not is_complete(root, t, sha)]
    if len(todo) < len(mine):
        log.info("resuming: %d of %d trajectories already complete", len(mine) - len(todo), len(mine))
    spinup = channel_spinup(sim, seed, root, sha) if any(t.domain == "channel" for t in todo) else None
    t0 = time.perf_counter()
    with tqdm(total=len(todo) * sim.frames, desc=f"simulate {sim.grid}^3", unit="frame") as bar:
        for traj in todo:
            bar.set_postfix_str(f"{traj.split}/{traj.name}")
            generate_trajectory(sim, traj, root, sha, spinup, bar)
    log.info("generated %d trajectories in %.1f s", len(todo), time.perf_counter() - t0)
    return merge_manifest(sim, seed, root) if merge else None


def merge_manifest(sim: SimConfig, seed: int, root: Path) -> dict:
    """Collect every trajectory record into raw/manifest.json (train-split statistics)."""
    identity = data_identity(sim, seed)
    sha = sha256_json(identity)
    parts = [part_path(root, traj) for traj in plan(sim, seed)]
    records = collect_parts(parts, raw_dir(root))
    for part, record in zip(parts, records):
        if record.get("config_sha") != sha:
            raise DataError(f"{part}: written by another config ({record.get('config_sha')}, expected {sha})")
    counts = split_counts(records, SPLITS, list(sim.domains))
    stats = {domain: {**moments([r for r in records if r["domain"] == domain and r["split"] == "train"]),
                      "split": "train"} for domain in sim.domains}
    keep = ("path", "split", "domain", "trajectory", "samples", "sha256", "porosity", "wall_s")
    manifest = {
        "format": MANIFEST_FORMAT, "config_sha": sha, "generator": identity, "grid": sim.grid,
        "domains": list(sim.domains), "frames": sim.frames,
        "shards": [{k: r[k] for k in keep if k in r} for r in records],
        "counts": counts, "stats": stats,
    }
    # Domains brought in by `shodh import` stay in the manifest when the simulation is rerun.
    manifest = fold_sections(manifest, [read_json(p, "import section") for p in import_section_files(root)])
    write_json_atomic(raw_manifest_path(root), manifest)
    return manifest
