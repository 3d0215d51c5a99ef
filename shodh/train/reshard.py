"""Elastic checkpoints: convert a ZeRO-2 (MoE) checkpoint to another world size and expert-parallel size.

DeepSpeed refuses to load ZeRO optimizer state into another data-parallel world, and its universal
checkpoint does not cover expert parallelism. This module rewrites a checkpoint tag, offline and
with plain tensors, into the files DeepSpeed itself writes for the new layout, so the unmodified
`engine.load_checkpoint` restores it there:

- `mp_rank_00_model_states.pt` (non-expert weights, LR scheduler, step counters, client state):
  kept, with the new `dp_world_size`, batch sizes in `ds_config` and rank 0's `param_shapes`.
- `layer_<l>_expert_<e>_...pt`: already stored by global expert index, copied as they are.
- `zero_pp_rank_<n>_mp_rank_00_optim_states.pt`, one per new rank: per optimizer group, the fp32
  master weights and Adam moments (exp_avg, exp_avg_sq) are gathered from the old partitions
  into one tensor per parameter (expert parameters renamed to their global index), then laid
  out as ZeRO-2 does for the new rank: the group's parameters in model order, flattened, padded
  to a multiple of 2 x (group's data-parallel size), cut into equal partitions. Non-expert groups
  are partitioned over the whole world; expert groups over the expert-data-parallel group (the
  ranks with the same expert-parallel rank, rank // ep_size within it), holding that rank's experts
  ep_rank * local ... ep_rank * local + local - 1. Step counts, hyperparameters and the loss
  scaler are carried over; MoE groups are renamed `ep_size_<new>`.
- shodh's own `rank-<n>.pt` (loader state mapped by `shodh.data.loader.remap_states`, which
  states the data-position guarantee; RNG) and `meta.json`.

Values are moved, never recomputed: every parameter and moment of the new layout equals the old
one bit for bit. The conversion writes into a hidden sibling folder and renames it into place
when complete (with its MANIFEST.json), so an interrupted conversion leaves nothing a resume
picks up; the source tag is only read.

Layout rules, checked before anything is loaded (`check_target`): E % ep_size == 0, world %
ep_size == 0, and the global batch (micro x accumulation x world) unchanged, or an error naming
the value that must change (optionally the accumulation is derived to keep it: `fit_grad_accum`).
Not covered (refused with an error): ZeRO stage 3, pipeline or tensor parallelism (mp_rank != 00),
`zero_optimization.parameter_alignment`, offloaded optimizer state.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import resource
import shutil
import time
from pathlib import Path

import torch

from shodh.data.loader import remap_states
from shodh.errors import ConfigError, DataError
from shodh.io import read_json, write_json_atomic, write_text_atomic
from shodh.train import checkpoint

log = logging.getLogger(__name__)

MODEL_STATES = "mp_rank_00_model_states.pt"
EXPERT_INDEX = re.compile(r"(\.deepspeed_experts\.)(\d+)(\.)")
MOMENTS = ("exp_avg", "exp_avg_sq")


def zero_file(rank: int) -> str:
    return f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt"


def converted_tag(tag: str, world: int, ep_size: int) -> str:
    return f"{tag}-w{world}-ep{ep_size}"


@dataclasses.dataclass(frozen=True)
class Target:
    world_size: int
    ep_size: int
    micro_batch: int
    grad_accum: int
    world_changed: bool = True  # the source was written by another number of ranks

    @property
    def global_batch(self) -> int:
        return self.micro_batch * self.grad_accum * self.world_size


def saved_batch(folder: Path) -> dict:
    """{world_size, ep_size, micro_batch, grad_accum, step, model} of a checkpoint, from meta.json
    (checkpoints written before meta.json carried the batch sizes: from DeepSpeed's ds_config)."""
    meta = read_json(folder / "meta.json", "checkpoint meta")
    if "micro_batch" not in meta:
        checkpoint.verify(folder, names=[MODEL_STATES])
        ds = _load(folder / MODEL_STATES)["ds_config"]
        meta = dict(meta, micro_batch=ds["train_micro_batch_size_per_gpu"], grad_accum=ds["gradient_accumulation_steps"])
    return meta


def fit_grad_accum(saved: dict, world: int, micro_batch: int) -> int:
    """The accumulation that keeps the saved global batch on `world` ranks of `micro_batch`, or an error."""
    global_batch = saved["micro_batch"] * saved["grad_accum"] * saved["world_size"]
    accum, rest = divmod(global_batch, micro_batch * world)
    if rest or accum < 1:
        raise ConfigError(f"train.micro_batch: the checkpoint's global batch {global_batch} is not micro_batch "
                          f"{micro_batch} x world {world} x an integer accumulation; choose a micro batch dividing "
                          f"{global_batch // world if global_batch % world == 0 else global_batch} for this world")
    return accum


def check_target(saved: dict, target: Target) -> None:
    """Refuse a layout the checkpoint cannot be converted to, naming what must change. Cheap: only meta."""
    model = saved.get("model") or {}
    experts, kind = int(model.get("num_experts", 1)), model.get("kind", "moe")
    if kind == "moe" and experts % target.ep_size:
        raise ConfigError(f"model.ep_size: must divide model.num_experts={experts}, got {target.ep_size}")
    if kind != "moe" and target.ep_size != 1:
        raise ConfigError(f"model.ep_size: dense models have no experts to shard; use 1, got {target.ep_size}")
    if target.world_size % target.ep_size:
        raise ConfigError(f"model.ep_size: must divide the world size {target.world_size}, got {target.ep_size}")
    old = saved["micro_batch"] * saved["grad_accum"] * saved["world_size"]
    if target.global_batch != old:
        hint = ""
        if old % (target.micro_batch * target.world_size) == 0:
            hint = f"set train.grad_accum={old // (target.micro_batch * target.world_size)} or "
        raise ConfigError(
            f"train.grad_accum: the global batch would change from {old} (micro {saved['micro_batch']} x accum "
            f"{saved['grad_accum']} x world {saved['world_size']}) to {target.global_batch} (micro "
            f"{target.micro_batch} x accum {target.grad_accum} x world {target.world_size}), which changes the "
            f"optimization; {hint}pass --keep-global-batch (train.keep_global_batch=true) to derive it")


def plan(folder: Path, cfg, world: int) -> Target | None:
    """train.resume=elastic: the conversion target for this run (world, model.ep_size, train.*), or
    None when checkpoint `folder` already has this layout. train.keep_global_batch derives
    grad_accum; otherwise a changed global batch is an error. Reads only meta.json."""
    saved = saved_batch(folder)
    if (saved["world_size"], saved["ep_size"]) == (world, cfg.model.ep_size):
        return None
    micro = cfg.train.micro_batch
    accum = fit_grad_accum(saved, world, micro) if cfg.train.keep_global_batch else cfg.train.grad_accum
    target = Target(world, cfg.model.ep_size, micro, accum, world_changed=saved["world_size"] != world)
    check_target(saved, target)
    return target


def reshard_run(run_dir: Path, world: int, ep_size: int, out: Path | None = None, micro_batch: int | None = None,
                grad_accum: int | None = None, keep_global_batch: bool = False, trust: bool = False) -> tuple[Path, dict]:
    """`shodh reshard`: convert the run's `latest` checkpoint to (world, ep_size). Written as
    `<tag>-w<W>-ep<E>` beside it (a later train.resume=elastic on that layout uses it), or into the
    checkpoints directory `out` with `latest` naming it (a run directory to resume). Micro batch and
    accumulation default to the checkpoint's; keep_global_batch derives the accumulation."""
    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir)
    if tag is None:
        raise DataError(f"{ckpt_dir}: no complete checkpoint (no '{checkpoint.LATEST}') to reshard")
    saved = saved_batch(ckpt_dir / tag)
    micro = micro_batch or int(saved["micro_batch"])
    if keep_global_batch:
        accum = fit_grad_accum(saved, world, micro)
    else:
        accum = grad_accum or int(saved["grad_accum"])
    target = Target(world, ep_size, micro, accum, world_changed=saved["world_size"] != world)
    check_target(saved, target)
    out_dir = Path(out) if out else ckpt_dir
    dst = out_dir / converted_tag(tag, world, ep_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    stats = convert(ckpt_dir / tag, dst, target, trust)
    if out_dir.resolve() != ckpt_dir.resolve():
        write_text_atomic(out_dir / checkpoint.LATEST, dst.name)
    return dst, stats


# DeepSpeed's ZeRO files hold three non-tensor objects besides plain containers: allow exactly these.
def _safe_globals() -> list:
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


def _load(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint file missing") from None
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise DataError(f"{path}: not loadable with weights_only=True ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _global_name(name: str, ep_rank: int, local: int) -> str:
    return EXPERT_INDEX.sub(lambda m: f"{m[1]}{ep_rank * local + int(m[2])}{m[3]}", name)


def _expert_names(template: list[str], ep_rank: int, local: int) -> list[tuple[str, str]]:
    """(local name, global name) of an expert group on `ep_rank` with `local` experts per layer, in the
    order DeepSpeed flattens them: named_parameters order, i.e. per MoE layer, expert by expert."""
    layers: dict[str, list[str]] = {}  # "<prefix>.deepspeed_experts." -> parameter suffixes of an expert
    for name in template:
        m = EXPERT_INDEX.search(name)
        if m is None:
            raise DataError(f"expert group parameter {name!r} carries no expert index")
        suffixes = layers.setdefault(name[:m.end(1)], [])
        if int(m[2]) == 0:
            suffixes.append(name[m.start(3):])
    out = []
    for prefix, suffixes in layers.items():
        for i in range(local):
            for suffix in suffixes:
                local_name = f"{prefix}{i}{suffix}"
                out.append((local_name, _global_name(local_name, ep_rank, local)))
    return out


def _group_ranks(world: int, ep_size: int, ep_rank: int | None) -> list[int]:
    """World ranks of one group's data-parallel group, in partition order: every rank for a
    non-expert group, else the expert-data-parallel group of `ep_rank` (DeepSpeed: r % ep_size)."""
    return list(range(world)) if ep_rank is None else list(range(ep_rank, world, ep_size))


def _layout_numbers(numel: int, dp: int, part: int) -> tuple[int, int, int]:
    """(partition size, partition start, trailing padding of partition `part`) for a group of `numel`."""
    align = 2 * dp
    size = -(-numel // align) * align // dp
    start = part * size
    padding = size if numel <= start else max(0, start + size - numel)
    return size, start, padding


def _gather(files: dict[int, dict], g: int, ranks: list[int], names: list[str], shapes: dict[str, tuple]) -> dict:
    """{name: {"fp32", "exp_avg", "exp_avg_sq"}} of group g from the partitions of `ranks`."""
    pieces: dict[str, list[torch.Tensor]] = {"fp32": [], **{k: [] for k in MOMENTS}}
    for n in ranks:
        sd = files[n]
        state = sd["base_optimizer_state"]["state"]
        moments = state[sd["base_optimizer_state"]["param_groups"][g]["params"][0]]
        padding = sd["group_paddings"][g]
        fp32 = sd["single_partition_of_fp32_groups"][g]
        pieces["fp32"].append(torch.cat([fp32, fp32.new_zeros(padding)]) if padding else fp32)
        for k in MOMENTS:
            pieces[k].append(moments[k])
    flats = {k: torch.cat(v) for k, v in pieces.items()}
    out, offset = {}, 0
    for name in names:
        numel = int(torch.Size(shapes[name]).numel())
        out[name] = {k: flat[offset:offset + numel] for k, flat in flats.items()}
        offset += numel
    if offset > flats["fp32"].numel():
        raise DataError(f"optimizer group {g}: partitions hold {flats['fp32'].numel()} values, parameters need {offset}")
    return out


def _steps(files: dict[int, dict]) -> list:
    """Per group, the Adam step count, checked equal on every rank."""
    found = None
    for n, sd in files.items():
        base = sd["base_optimizer_state"]
        steps = [base["state"][grp["params"][0]].get("step") for grp in base["param_groups"]]
        values = [float(s) if s is not None else None for s in steps]
        if found is None:
            found = (steps, values)
        elif values != found[1]:
            raise DataError(f"{zero_file(n)}: Adam step counts {values} differ from rank 0's {found[1]}")
    return found[0]


def convert(src: Path, dst: Path, target: Target, trust: bool = False) -> dict:
    """Write checkpoint `src` (a tag folder) for `target` into the new tag folder `dst`; returns
    {"seconds", "peak_rss_mib", "bytes"}."""
    from deepspeed.utils.tensor_fragment import fragment_address

    t0, rss0 = time.perf_counter(), _rss_mib()
    if dst.exists():
        raise DataError(f"{dst}: already exists; remove it or choose another --out")
    saved = saved_batch(src)
    check_target(saved, target)
    checkpoint.verify(src, trust)  # every file, before any is unpickled
    old_world, old_ep = int(saved["world_size"]), int(saved["ep_size"])
    model_states = _load(src / MODEL_STATES)
    ds_config = model_states["ds_config"]
    zero_cfg = ds_config.get("zero_optimization", {})
    if zero_cfg.get("stage") != 2 or zero_cfg.get("parameter_alignment") or zero_cfg.get("offload_optimizer"):
        raise DataError(f"{src / MODEL_STATES}: reshard converts ZeRO stage 2 without parameter_alignment or "
                        f"optimizer offload; this checkpoint has zero_optimization={zero_cfg}")
    log.info("reshard %s: world %d ep %d -> world %d ep %d, reading %d optimizer partitions", src.name, old_world,
             old_ep, target.world_size, target.ep_size, old_world)
    files = {n: _load(src / zero_file(n))["optimizer_state_dict"] for n in range(old_world)}
    if any(any(p) for p in files[0]["param_alignment_paddings"]):
        raise DataError(f"{src / zero_file(0)}: parameter-alignment padding is not supported by reshard")
    groups = files[0]["base_optimizer_state"]["param_groups"]
    # What the new files keep from rank 0's besides the tensors (loss scaler, clipping, stage, version).
    first = {k: v for k, v in files[0].items() if k not in ("base_optimizer_state", "single_partition_of_fp32_groups")}
    shapes_rank0 = model_states["param_shapes"]
    steps = _steps(files)
    experts = int((saved.get("model") or {}).get("num_experts", 1))
    old_local, new_local = experts // old_ep, experts // target.ep_size

    # Every parameter's fp32 weight and moments under its global name, group by group.
    merged: list[dict[str, dict]] = []
    templates: list[list[str] | None] = []  # expert groups: rank 0's local names; None: not an expert group
    shapes: dict[str, tuple] = {}
    for g, grp in enumerate(groups):
        local_shapes = shapes_rank0[g]
        if grp.get("moe"):
            templates.append(list(local_shapes))
            group = {}
            for e in range(old_ep):
                pairs = _expert_names(list(local_shapes), e, old_local)
                if [p[0] for p in pairs] != list(local_shapes):
                    raise DataError(f"{src / MODEL_STATES}: expert group {g} is not ordered layer by layer, expert "
                                    f"by expert; reshard cannot place its partitions")
                named = {glob: local_shapes[loc] for loc, glob in pairs}
                shapes.update(named)
                group.update(_gather(files, g, _group_ranks(old_world, old_ep, e), list(named), shapes))
        else:
            templates.append(None)
            shapes.update(local_shapes)
            group = _gather(files, g, _group_ranks(old_world, old_ep, None), list(local_shapes), shapes)
        merged.append(group)
    del files  # only the merged copy is needed from here on (measured peak: ~40 bytes per parameter)

    for stale in dst.parent.glob(f".tmp-{dst.name}-*"):  # left by a conversion that was killed
        shutil.rmtree(stale, ignore_errors=True)
    tmp = dst.with_name(f".tmp-{dst.name}-{os.getpid()}")
    tmp.mkdir(parents=True)
    try:
        new_shapes_rank0 = []
        for n in range(target.world_size):
            ep_rank = n % target.ep_size
            sd = {k: v for k, v in first.items() if k != "param_slice_mappings"}
            fp32_parts, paddings, counts, mappings, state, new_groups, align = [], [], [], [], {}, [], []
            for g, grp in enumerate(groups):
                if templates[g] is None:
                    pairs = [(name, name) for name in merged[g]]
                    ranks = _group_ranks(target.world_size, target.ep_size, None)
                else:
                    pairs = _expert_names(templates[g], ep_rank, new_local)
                    ranks = _group_ranks(target.world_size, target.ep_size, ep_rank)
                if n == 0:
                    new_shapes_rank0.append(type(shapes_rank0[g])((loc, shapes[glob]) for loc, glob in pairs))
                dp, part = len(ranks), ranks.index(n)
                numel = sum(merged[g][glob]["fp32"].numel() for _, glob in pairs)
                size, start, padding = _layout_numbers(numel, dp, part)
                flats = {k: torch.cat([merged[g][glob][k] for _, glob in pairs]) for k in ("fp32", *MOMENTS)}
                parts = {k: torch.cat([f, f.new_zeros(size * dp - numel)])[start:start + size].clone()
                         for k, f in flats.items()}
                fp32_parts.append(parts["fp32"][:size - padding].clone())
                paddings.append(padding)
                counts.append(dp)
                align.append([0] * len(pairs))
                mapping, offset = type(first["param_slice_mappings"][g])(), 0
                for loc, glob in pairs:
                    numel_p = merged[g][glob]["fp32"].numel()
                    lo, hi = max(offset, start), min(offset + numel_p, start + size)
                    if lo < hi:
                        mapping[loc] = fragment_address(numel=hi - lo, start=lo - start)
                    offset += numel_p
                mappings.append(mapping)
                state[g] = {"step": steps[g], "exp_avg": parts["exp_avg"], "exp_avg_sq": parts["exp_avg_sq"]}
                renamed = dict(grp, params=[g])
                if grp.get("moe"):
                    renamed["name"] = f"ep_size_{target.ep_size}"
                new_groups.append(renamed)
            sd.update(base_optimizer_state={"state": state, "param_groups": new_groups},
                      single_partition_of_fp32_groups=fp32_parts, group_paddings=paddings,
                      param_alignment_paddings=align, partition_count=counts, param_slice_mappings=mappings)
            torch.save({"optimizer_state_dict": sd, "ds_config": _new_ds_config(ds_config, target),
                        "ds_version": model_states["ds_version"]}, tmp / zero_file(n))
            log.info("reshard: wrote %s", zero_file(n))

        new_model = dict(saved.get("model") or {}, ep_size=target.ep_size)
        states = dict(model_states, dp_world_size=target.world_size, param_shapes=new_shapes_rank0,
                      ds_config=_new_ds_config(ds_config, target))
        if isinstance(states.get("config"), dict):  # shodh's client state: the resolved run config
            config = dict(states["config"], model=dict(states["config"].get("model", {}), ep_size=target.ep_size))
            config["train"] = dict(config.get("train", {}), micro_batch=target.micro_batch, grad_accum=target.grad_accum)
            states["config"] = config
        torch.save(states, tmp / MODEL_STATES)
        for path in sorted(src.iterdir()):
            if checkpoint.EXPERT_FILE.match(path.name):
                shutil.copyfile(path, tmp / path.name)
        step = int(saved["step"])
        old_ranks = {n: _load_rank(src, n) for n in range(old_world)}
        for n, mine in enumerate(map_rank_states(old_ranks, target.world_size, step)):
            torch.save(mine, tmp / f"rank-{n:05d}.pt")
        write_json_atomic(tmp / "meta.json", {
            "step": step, "world_size": target.world_size, "ep_size": target.ep_size, "model": new_model,
            "micro_batch": target.micro_batch, "grad_accum": target.grad_accum,
            "resharded_from": {"tag": src.name, "world_size": old_world, "ep_size": old_ep}})
        checkpoint.write_manifest(tmp)
        _fsync_dir(tmp)
        os.rename(tmp, dst)  # atomic: `dst` appears complete (with its manifest) or not at all
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    stats = {"seconds": time.perf_counter() - t0, "rss_before_mib": rss0,
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
             "bytes": sum(p.stat().st_size for p in dst.iterdir())}
    log.info("reshard: %s written in %.1f s (%.0f MiB on disk, peak RSS %.0f MiB, %.0f MiB before)", dst,
             stats["seconds"], stats["bytes"] / 2**20, stats["peak_rss_mib"], rss0)
    return stats


def _new_ds_config(ds_config: dict, target: Target) -> dict:
    return dict(ds_config, train_batch_size=target.global_batch, train_micro_batch_size_per_gpu=target.micro_batch,
                gradient_accumulation_steps=target.grad_accum)


def _load_rank(src: Path, n: int) -> dict:
    path = src / f"rank-{n:05d}.pt"
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise DataError(f"{path}: checkpoint file missing") from None


def map_rank_states(old: dict[int, dict], world: int, step: int) -> list[dict]:
    """Every new rank's shodh state {"loader", "rng"}. The loader states map as
    `shodh.data.loader.remap_states` states (kept on the same world size, else None: fresh streams).
    RNG: a rank that existed keeps its torch RNG state; a new rank gets a generator seeded by
    (step, rank), distinct from every other rank's stream."""
    loaders = remap_states([old[n]["loader"] for n in sorted(old)], world)
    return [{"loader": loaders[n],
             "rng": old[n]["rng"] if n in old else
             {"torch": torch.Generator().manual_seed(1_000_003 * step + n).get_state()}} for n in range(world)]


def _rss_mib() -> float:
    """This process's resident memory now (Linux /proc), for the conversion's cost report."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return float("nan")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
