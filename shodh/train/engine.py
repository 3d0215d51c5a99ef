"""Build the DeepSpeed engine: layout checks, ds_config resolution, model, MoE optimizer groups, schedule.

Everything that can be wrong with a layout (E % ep_size, world % ep_size, batch arithmetic) is
checked here before a process group, a model or a buffer exists, with errors naming the field.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from shodh.distributed import DistInfo, unlink_deepspeed_shm
from shodh.errors import ConfigError
from shodh.model import params
from shodh.model.config import ModelConfig
from shodh.schedule import lr_factor
from shodh.train.config import TrainConfig

# Keys the ds_config files must not set: they are derived from train.* once, here.
DERIVED_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


@dataclass(frozen=True)
class Layout:
    world_size: int
    ep_size: int
    micro_batch: int
    grad_accum: int
    rank: int

    @property
    def global_batch(self) -> int:
        # Every rank draws its own micro batch: with expert parallelism the non-expert weights are
        # still data-parallel over the whole world, so all ranks count as data-parallel for samples.
        return self.micro_batch * self.grad_accum * self.world_size

    @property
    def ep_rank(self) -> int:
        # DeepSpeed builds expert-parallel groups of consecutive ranks: [0..ep-1], [ep..2ep-1], ...
        return self.rank % self.ep_size


def check_layout(model: ModelConfig, train: TrainConfig, info: DistInfo) -> Layout:
    """Validate the parallel layout before anything is built; derive the batch sizes once."""
    if model.num_experts % model.ep_size:
        raise ConfigError(f"model.ep_size: must divide model.num_experts={model.num_experts}, got {model.ep_size}")
    if model.kind == "moe" and info.world_size % model.ep_size:
        raise ConfigError(f"model.ep_size: must divide the world size {info.world_size} (ranks launched), "
                          f"got {model.ep_size}")
    if model.kind != "moe" and model.ep_size != 1:
        raise ConfigError(f"model.ep_size: dense models have no experts to shard; use 1, got {model.ep_size}")
    layout = Layout(info.world_size, model.ep_size, train.micro_batch, train.grad_accum, info.rank)
    if train.global_batch and train.global_batch != layout.global_batch:
        raise ConfigError(
            f"train.global_batch: {train.global_batch} != micro_batch {train.micro_batch} x grad_accum "
            f"{train.grad_accum} x world {info.world_size} = {layout.global_batch}; set it to 0 to derive it")
    return layout


def ds_config_path(name: str):
    """train.ds_config as a file: an explicit path (anything with a '/' or an existing file), else a
    name among the shipped configs (top-level ds_configs/, installed as the package `shodh.ds_configs`)."""
    if "/" in name or Path(name).is_file():
        return Path(name)
    return resources.files("shodh.ds_configs").joinpath(name)


def load_ds_config(train: TrainConfig, layout: Layout) -> dict:
    """The ds_configs/ JSON (chosen by device unless train.ds_config names one) plus derived batch sizes."""
    name = train.ds_config or ("zero2_gpu_bf16.json" if torch.cuda.is_available() else "zero2_cpu_fp32.json")
    path = ds_config_path(name)
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"train.ds_config: file not found: {path}") from None
    except ValueError as exc:
        raise ConfigError(f"train.ds_config: {path} is not valid JSON ({exc})") from None
    clash = [k for k in DERIVED_KEYS if k in cfg]
    if clash:
        raise ConfigError(f"train.ds_config: {path} sets {clash}; batch sizes come from train.micro_batch, "
                          f"train.grad_accum and the world size")
    if cfg.get("zero_optimization", {}).get("stage", 0) > 2:
        raise ConfigError(f"train.ds_config: {path}: DeepSpeed MoE needs ZeRO stage <= 2")
    cfg = copy.deepcopy(cfg)
    cfg.update(train_batch_size=layout.global_batch, train_micro_batch_size_per_gpu=layout.micro_batch,
               gradient_accumulation_steps=layout.grad_accum)
    return cfg


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay by the parameters' tags (`shodh.model.params.decays`), then let DeepSpeed split expert
    params into their own groups (their gradients are reduced over the expert-data-parallel group)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if params.decays(p, name) else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"}]
    return split_params_into_different_moe_groups_for_optimizer([g for g in groups if g["params"]])


def build_engine(model_cfg: ModelConfig, train: TrainConfig, layout: Layout, ds_config: dict, channels: int,
                 seed: int, lr_offset: int = 0):
    """(engine, model) with DeepSpeed's ZeRO optimizer around a torch AdamW client optimizer.
    AdamW is a client optimizer because a ds_config optimizer JIT-builds fused Adam (minutes on CPU)."""
    import deepspeed
    from deepspeed.utils import groups

    from shodh.model.transformer import LatentTransformer

    # Same seed on every rank: non-expert weights agree before DeepSpeed's broadcast, and each expert
    # is seeded by its global index, so every layout holds the same experts.
    torch.manual_seed(seed)
    local = model_cfg.num_experts // model_cfg.ep_size
    model = LatentTransformer(model_cfg, channels, seed=seed, expert_offset=layout.ep_rank * local)
    # fused: one kernel per step over ZeRO's flat partitions (CPU and CUDA), not a dozen elementwise passes.
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.95), fused=True)
    # `lr_offset` continues the schedule of a weights-only resume at its step.
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: lr_factor(
        i + lr_offset, train.warmup_steps, train.max_steps, train.min_lr_ratio))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    unlink_deepspeed_shm()
    if model_cfg.kind == "moe" and layout.world_size > 1:
        ep_rank = groups._get_expert_parallel_rank(f"ep_size_{model_cfg.ep_size}")
        assert ep_rank == layout.ep_rank, f"DeepSpeed put rank {layout.rank} at ep rank {ep_rank}, expected {layout.ep_rank}"
    torch.manual_seed(seed + 1 + layout.rank)  # distinct Random Token Selection / noise streams per rank
    return engine, model
