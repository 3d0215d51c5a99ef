"""Checkpoints: DeepSpeed's engine files plus the per-rank state DeepSpeed does not keep.

Layout of `RUN_DIR/checkpoints/`:
- `step-000100/`: DeepSpeed's `save_checkpoint` output (model, per-expert and ZeRO optimizer
  files; its client state holds {step, config}), plus ours: `rank-00000.pt` per rank (loader
  state and RNG states; plain tensors and ints, loaded with `weights_only=True`) and `meta.json`
  (step, parallel layout and batch sizes, read before DeepSpeed touches anything).
- `step-000100-w1-ep1/`: the same checkpoint converted to another layout (world 1, ep_size 1) by
  train.resume=elastic or `shodh reshard` (shodh.train.reshard); complete when it appears.
- `latest`: the tag, rewritten atomically by rank 0 only after every rank finished writing,
  so a crash mid-save leaves the previous checkpoint as `latest`.
- `MANIFEST.json` in each tag: sha256 and size of every file of the checkpoint, written by rank 0
  after all ranks finished and before `latest` moves. Resume and inference verify it before
  anything is unpickled, and refuse a checkpoint without one unless train.trust_checkpoint
  (`--trust-checkpoint`): a corrupted or swapped file is found before DeepSpeed's
  `torch.load(weights_only=False)` runs code from it.
A checkpoint is only written from finite state (parameters and Adam moments, one fused norm per
rank, all-reduced): a save is skipped, not written, when the state is not finite.
DeepSpeed's own loader unpickles its files (`torch.load(weights_only=False)`): only resume
from checkpoints you wrote. Inference (`load_for_inference`: evaluation, the study's probes) reads
only the model-state files, with `weights_only=True`, into a plain model: no engine, no optimizer.
"""

from __future__ import annotations

import logging
import re
import shutil
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from shodh.errors import DataError, ShodhError
from shodh.io import read_json, sha256_file, write_atomic, write_json_atomic, write_text_atomic

log = logging.getLogger(__name__)
LATEST = "latest"
MANIFEST = "MANIFEST.json"


def tag_for(step: int) -> str:
    return f"step-{step:06d}"


@dataclass
class Resumed:
    step: int
    loader_state: dict | None  # None for a weights-only resume: the data stream starts afresh
    full: bool


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def state_is_finite(engine) -> bool:
    """True on every rank when every rank's parameters and optimizer moments are finite: one fused
    norm per tensor list (torch._foreach_norm), a non-finite norm marks the rank, all-reduced."""
    tensors = [p.detach() for p in engine.module.parameters()]
    base = getattr(engine.optimizer, "optimizer", engine.optimizer)  # ZeRO wraps the torch optimizer
    for state in getattr(base, "state", {}).values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    norms = torch._foreach_norm([t.float() for t in tensors]) if tensors else []
    bad = torch.tensor([0.0 if all(torch.isfinite(n) for n in norms) else 1.0], device=engine.device)
    if dist.is_initialized():
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad.item() == 0)


def _sha256_entry(path: Path) -> dict:
    return {"sha256": sha256_file(path), "bytes": path.stat().st_size}


def write_manifest(folder: Path) -> None:
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != MANIFEST and ".tmp-" not in p.name)
    write_json_atomic(folder / MANIFEST, {"files": {p.name: _sha256_entry(p) for p in files}})


def verify(folder: Path, trust: bool = False, names: list[str] | None = None) -> None:
    """Check the checkpoint's files against its MANIFEST.json (all of them, or `names`) before any is
    loaded. No manifest: refused unless `trust` (train.trust_checkpoint / --trust-checkpoint)."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        if trust:
            log.warning("%s: no %s; loading it anyway (train.trust_checkpoint)", folder, MANIFEST)
            return
        raise ShodhError(f"{folder}: no {MANIFEST} (not written by this version of shodh, or an incomplete copy); "
                         f"DeepSpeed would unpickle its files unverified. Pass --trust-checkpoint "
                         f"(train.trust_checkpoint=true) only for checkpoints you wrote yourself")
    files = read_json(manifest_path, "checkpoint manifest").get("files", {})
    for name in names if names is not None else sorted(files):
        path = folder / name
        if name not in files:
            raise DataError(f"{path}: not listed in {manifest_path}")
        if not path.is_file():
            raise DataError(f"{path}: listed in {MANIFEST} but missing")
        found = _sha256_entry(path)
        if found != files[name]:
            raise DataError(f"{path}: sha256 {found['sha256'][:16]} ({found['bytes']} bytes) does not match "
                            f"{MANIFEST} ({files[name]['sha256'][:16]}, {files[name]['bytes']} bytes): "
                            f"corrupted or replaced; resume from another checkpoint")


def save(engine, ckpt_dir: Path, step: int, rank: int, layout: dict, loader_state: dict, config: dict) -> str:
    """Write a complete checkpoint for `step` on every rank; move `latest` to it last."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mine = {"loader": loader_state, "rng": rng_state()}
        write_atomic(folder / f"rank-{rank:05d}.pt", lambda tmp: torch.save(mine, tmp))
        if rank == 0:
            write_json_atomic(folder / "meta.json", {"step": step, **layout, "model": config["model"]})
        engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "config": config},
                               save_latest=False)
        dist.barrier()  # every rank's files are on disk before the manifest covers them
        if rank == 0:
            write_manifest(folder)
            write_text_atomic(ckpt_dir / LATEST, tag)
    except (OSError, RuntimeError) as exc:
        # torch.save reports a full disk as RuntimeError ("basic_ios::clear" / "unexpected pos").
        latest = latest_tag(ckpt_dir)
        if latest != tag:
            shutil.rmtree(folder, ignore_errors=True)  # a partial tag is never picked up, but takes space
        kept = f"`latest` still names {latest}, which is intact" if latest else "no earlier checkpoint exists"
        raise ShodhError(f"{folder}: writing the checkpoint failed ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no detail'}); is the disk full? {kept}") from None
    dist.barrier()
    return tag


def latest_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def inspect(ckpt_dir: Path, layout: dict, mode: str, model: dict | None = None) -> tuple[str, int] | None:
    """(tag, step) of `latest`, or None. Checked before anything is built: mode "auto" restores
    everything and needs the same layout; "weights" takes the model weights to any layout;
    "elastic" restores everything into any layout (shodh.train.reshard checks and converts). All
    need the model config the checkpoint was trained with (`model`, the resolved model.* section;
    ep_size aside, which is layout)."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    meta = read_json(ckpt_dir / tag / "meta.json", "checkpoint meta")
    saved_model = meta.get("model")
    if model is not None and saved_model is not None:
        differ = sorted(k for k in set(model) | set(saved_model)
                        if k != "ep_size" and model.get(k) != saved_model.get(k))
        if differ:
            pairs = ", ".join(f"model.{k}: checkpoint {saved_model.get(k)!r}, now {model.get(k)!r}" for k in differ)
            raise ShodhError(f"{ckpt_dir / tag}: trained with another model ({pairs}); resume with the run's "
                             f"model config or start a new run (--run-name)")
    saved = {k: meta.get(k) for k in layout}
    if mode == "auto" and saved != layout:
        raise ShodhError(
            f"{ckpt_dir / tag}: written with {saved}, this run has {layout}. DeepSpeed cannot restore "
            f"ZeRO optimizer state (nor our per-rank data streams) across world sizes or expert-parallel "
            f"layouts by itself. Rerun with the original layout, with train.resume=elastic to convert the "
            f"checkpoint to this layout (optimizer state kept), or with train.resume=weights to load only the "
            f"model weights (experts are stored per global index, so any ep_size works) and restart the "
            f"optimizer moments and the data stream at step {meta['step']}."
        )
    return tag, int(meta["step"])


def restore(engine, ckpt_dir: Path, tag: str, rank: int, mode: str, trust: bool = False) -> Resumed:
    verify(ckpt_dir / tag, trust)  # before DeepSpeed unpickles any of it
    if mode == "weights":
        engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        return Resumed(step=int(read_json(ckpt_dir / tag / "meta.json")["step"]), loader_state=None, full=False)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ShodhError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    mine = torch.load(ckpt_dir / tag / f"rank-{rank:05d}.pt", weights_only=True)
    set_rng_state(mine["rng"])
    resync_lr(engine.optimizer, engine.lr_scheduler)
    return Resumed(step=int(client["step"]), loader_state=mine["loader"], full=True)


def resync_lr(optimizer, scheduler) -> None:
    """After a full resume, the learning rate of this launch's schedule at the restored step.
    DeepSpeed restores the scheduler's step count and the optimizer's lr as the old launch left
    it, but a LambdaLR's lambda is this launch's (e.g. a longer train.max_steps): without this, the
    first resumed step would run at the old schedule's lr."""
    if scheduler is None:
        return
    for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # what get_last_lr() reports


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints of a run (those with a manifest, written last), in step order."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step-*") if (p / MANIFEST).is_file())


def _load_states(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise DataError(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from None


EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def load_weights(model: torch.nn.Module, ckpt_dir: Path, tag: str, trust: bool = False) -> int:
    """Load checkpoint `tag` into a single-process model (every expert local, ep_size=1); returns its step.

    DeepSpeed stores the non-expert weights in `mp_rank_00_model_states.pt` ("module") and every
    expert in `layer_<moe layer>_expert_<global index>_...pt` under its global index, which is the
    local index when one process holds all experts, so whatever layout trained the run, the files
    merge into this model's state dict as they are. Strict: a missing or extra key is an error.
    """
    folder = Path(ckpt_dir) / tag
    names = ["meta.json", "mp_rank_00_model_states.pt"] + sorted(p.name for p in folder.iterdir()
                                                                 if EXPERT_FILE.match(p.name))
    verify(folder, trust, names)
    step = int(read_json(folder / "meta.json", "checkpoint meta")["step"])
    state = dict(_load_states(folder / "mp_rank_00_model_states.pt")["module"])
    for name in names[2:]:
        state.update(_load_states(folder / name))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{folder}: weights do not fit this model (missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}); was the run trained with another model.* config?")
    return step


def load_for_inference(run_cfg, run_dir: Path, channels: int, tag: str | None = None, trust: bool = False):
    """The run's latest checkpoint (or `tag`) as a plain model in eval mode on this process's device,
    in the precision the run trained in: (model, step, device, dtype). No engine, no optimizer."""
    from shodh.distributed import choose_device, dist_info
    from shodh.model.transformer import LatentTransformer

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise ShodhError(f"{ckpt_dir}: no complete checkpoint (no '{LATEST}'); pretraining writes one "
                         f"every train.ckpt_every steps and at the end")
    ds_config = read_json(Path(run_dir) / "ds_config.json", "run's DeepSpeed config")
    device = choose_device("auto", dist_info())
    dtype = torch.bfloat16 if ds_config.get("bf16", {}).get("enabled") and device.type == "cuda" else torch.float32
    model = LatentTransformer(replace(run_cfg.model, ep_size=1), channels, seed=run_cfg.seed)
    step = load_weights(model, ckpt_dir, tag, trust or run_cfg.train.trust_checkpoint)
    return model.to(device, dtype).eval(), step, device, dtype


def finite_weights(model_cfg, run_dir: Path, channels: int, tag: str) -> bool:
    """Whether checkpoint `tag` loads (manifest verified) and holds only finite weights."""
    from shodh.model.transformer import LatentTransformer

    model = LatentTransformer(replace(model_cfg, ep_size=1), channels)
    try:
        load_weights(model, Path(run_dir) / "checkpoints", tag)
    except ShodhError:
        return False
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())
