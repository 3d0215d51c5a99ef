"""Checkpoints: DeepSpeed's engine files plus the per-rank state DeepSpeed does not keep.

Layout of `RUN_DIR/checkpoints/`:
- `step-000100/`: DeepSpeed's `save_checkpoint` output (model, per-expert and ZeRO optimizer
  files; its client state holds {step, config}), plus ours: `rank-00000.pt` per rank (loader
  state and RNG states; plain tensors and ints, loaded with `weights_only=True`) and `meta.json`
  (step and parallel layout, read before DeepSpeed touches anything).
- `latest`: the tag, rewritten atomically by rank 0 only after every rank finished writing,
  so a crash mid-save leaves the previous checkpoint as `latest`.
DeepSpeed's own loader unpickles its files (`torch.load(weights_only=False)`): only resume
from checkpoints you wrote. Inference (`load_for_inference`: evaluation, the study's probes) reads
only the model-state files, with `weights_only=True`, into a plain model: no engine, no optimizer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist

from shodh.errors import DataError, ShodhError
from shodh.io import read_json, write_atomic, write_json_atomic, write_text_atomic

LATEST = "latest"


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


def save(engine, ckpt_dir: Path, step: int, rank: int, layout: dict, loader_state: dict, config: dict) -> str:
    """Write a complete checkpoint for `step` on every rank; move `latest` to it last."""
    tag = tag_for(step)
    folder = ckpt_dir / tag
    folder.mkdir(parents=True, exist_ok=True)
    mine = {"loader": loader_state, "rng": rng_state()}
    write_atomic(folder / f"rank-{rank:05d}.pt", lambda tmp: torch.save(mine, tmp))
    if rank == 0:
        write_json_atomic(folder / "meta.json", {"step": step, **layout})
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state={"step": step, "config": config},
                           save_latest=False)
    dist.barrier()  # every rank's files are on disk before `latest` points at them
    if rank == 0:
        write_text_atomic(ckpt_dir / LATEST, tag)
    dist.barrier()
    return tag


def latest_tag(ckpt_dir: Path) -> str | None:
    path = ckpt_dir / LATEST
    return path.read_text().strip() if path.is_file() else None


def inspect(ckpt_dir: Path, layout: dict, mode: str) -> tuple[str, int] | None:
    """(tag, step) of `latest`, or None. Checked before anything is built: mode "auto" restores
    everything and needs the same layout; "weights" takes the model weights to any layout."""
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return None
    meta = read_json(ckpt_dir / tag / "meta.json", "checkpoint meta")
    saved = {k: meta.get(k) for k in layout}
    if mode == "auto" and saved != layout:
        raise ShodhError(
            f"{ckpt_dir / tag}: written with {saved}, this run has {layout}. DeepSpeed cannot restore "
            f"ZeRO optimizer state (nor our per-rank data streams) across world sizes or expert-parallel "
            f"layouts. Rerun with the original layout, or with train.resume=weights to load only the model "
            f"weights (experts are stored per global index, so any ep_size works) and restart the "
            f"optimizer moments and the data stream at step {meta['step']}."
        )
    return tag, int(meta["step"])


def restore(engine, ckpt_dir: Path, tag: str, rank: int, mode: str) -> Resumed:
    if mode == "weights":
        engine.load_checkpoint(str(ckpt_dir), tag=tag, load_module_only=True, load_optimizer_states=False,
                               load_lr_scheduler_states=False)
        return Resumed(step=int(read_json(ckpt_dir / tag / "meta.json")["step"]), loader_state=None, full=False)
    path, client = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise ShodhError(f"{ckpt_dir / tag}: DeepSpeed could not load this checkpoint")
    mine = torch.load(ckpt_dir / tag / f"rank-{rank:05d}.pt", weights_only=True)
    set_rng_state(mine["rng"])
    return Resumed(step=int(client["step"]), loader_state=mine["loader"], full=True)


def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    """Tags of the complete checkpoints of a run (those with our meta.json), in step order."""
    return sorted(p.name for p in Path(ckpt_dir).glob("step-*") if (p / "meta.json").is_file())


def _load_states(path: Path) -> dict:
    if not path.is_file():
        raise DataError(f"{path}: checkpoint file missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling errors come in many types
        raise DataError(f"{path}: not a loadable weights file ({type(exc).__name__}: {exc})") from None


EXPERT_FILE = re.compile(r"layer_(\d+)_expert_(\d+)_mp_rank_00_model_states\.pt$")


def load_weights(model: torch.nn.Module, ckpt_dir: Path, tag: str) -> int:
    """Load checkpoint `tag` into a single-process model (every expert local, ep_size=1); returns its step.

    DeepSpeed stores the non-expert weights in `mp_rank_00_model_states.pt` ("module") and every
    expert in `layer_<moe layer>_expert_<global index>_...pt` under its global index, which is the
    local index when one process holds all experts, so whatever layout trained the run, the files
    merge into this model's state dict as they are. Strict: a missing or extra key is an error.
    """
    folder = Path(ckpt_dir) / tag
    step = int(read_json(folder / "meta.json", "checkpoint meta")["step"])
    state = dict(_load_states(folder / "mp_rank_00_model_states.pt")["module"])
    for path in sorted(folder.iterdir()):
        if EXPERT_FILE.match(path.name):
            state.update(_load_states(path))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(f"{folder}: weights do not fit this model (missing {missing[:4]}, unexpected "
                        f"{unexpected[:4]}); was the run trained with another model.* config?")
    return step


def load_for_inference(run_cfg, run_dir: Path, channels: int, tag: str | None = None):
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
    step = load_weights(model, ckpt_dir, tag)
    return model.to(device, dtype).eval(), step, device, dtype
