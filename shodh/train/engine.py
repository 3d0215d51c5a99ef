"""Build the DeepSpeed engine: layout checks, ds_config resolution, model, MoE optimizer groups, schedule.

Everything that can be wrong with a layout (E % ep_size, world % ep_size, batch arithmetic) is
checked here before a process group, a model or a buffer exists, with errors naming the field.
"""

from __future__ import annotations

import copy
import json
import math
import socket
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from shodh.distributed import DistInfo, export_env
from shodh.errors import ConfigError
from shodh.model.config import ModelConfig
from shodh.train.config import TrainConfig

DS_CONFIG_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
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


def load_ds_config(train: TrainConfig, layout: Layout) -> dict:
    """The ds_configs/ JSON (chosen by device unless train.ds_config names one) plus derived batch sizes."""
    name = train.ds_config or ("zero2_gpu_bf16.json" if torch.cuda.is_available() else "zero2_cpu_fp32.json")
    path = Path(name) if ("/" in name or Path(name).is_file()) else DS_CONFIG_DIR / name
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


def free_port() -> int:
    """A free TCP port for a single-process run's rendezvous (29500 may be taken by a neighbour)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(info: DistInfo) -> DistInfo:
    import deepspeed

    if info.source == "single":
        info = replace(info, master_port=free_port())
    export_env(info)
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo",
                               auto_mpi_discovery=False, verbose=False)
    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    return info


def lr_lambda(train: TrainConfig, offset: int = 0):
    """Linear warmup then cosine decay to lr * min_lr_ratio, as a factor of train.lr.
    `offset` continues the schedule of a weights-only resume at its step."""
    def factor(i: int) -> float:
        step = i + offset
        if step < train.warmup_steps:
            return (step + 1) / (train.warmup_steps + 1)
        span = max(1, train.max_steps - train.warmup_steps)
        progress = min(1.0, (step - train.warmup_steps) / span)
        return train.min_lr_ratio + (1 - train.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return factor


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only, then let DeepSpeed split expert params into their own groups
    (their gradients are reduced over the expert-data-parallel group, not the whole world)."""
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 and not name.startswith("pos_") else no_decay).append(p)
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
    optimizer = torch.optim.AdamW(param_groups(model, train.weight_decay), lr=train.lr, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train, lr_offset))
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if model_cfg.kind == "moe" and layout.world_size > 1:
        ep_rank = groups._get_expert_parallel_rank(f"ep_size_{model_cfg.ep_size}")
        assert ep_rank == layout.ep_rank, f"DeepSpeed put rank {layout.rank} at ep rank {ep_rank}, expected {layout.ep_rank}"
    torch.manual_seed(seed + 1 + layout.rank)  # distinct Random Token Selection / noise streams per rank
    return engine, model
