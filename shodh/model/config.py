"""Model configuration (section `model`), kept free of torch/DeepSpeed imports so loading a config is cheap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from shodh.errors import check
from shodh.workspace import LATENT


@dataclass
class ModelConfig:
    kind: Literal["moe", "dense_active", "dense_total"] = "moe"
    patch: int = 4  # p: latent voxels per token edge; 16/p tokens per axis
    dim: int = 128  # D
    depth: int = 4  # L blocks
    heads: int = 4
    expert_dim: int = 256  # H of one expert (and of the shared expert)
    num_experts: int = 4  # E
    ep_size: int = 1  # expert-parallel ranks; E % ep_size == 0 and world % ep_size == 0
    moe_every: int = 2  # block i is MoE when (i + 1) % moe_every == 0
    capacity_factor: float = 1.25  # training capacity = ceil(factor * tokens / E) per expert
    eval_capacity_factor: float = 2.0  # DeepSpeed eval-mode capacity; our validation never drops
    min_capacity: int = 4
    noisy_gate_policy: Literal["none", "Jitter", "RSample"] = "none"
    shared_expert: bool = True  # DeepSpeed residual MoE: a dense expert every token also passes
    aux_loss_coef: float = 0.01  # loss = mse + coef * Σ_layers Switch aux loss
    # Router control for `shodh study` (moe.FixedGate): learned = W_g·x (the model); hash = each token
    # position goes to a fixed, balanced, seeded expert; oracle = the sample's domain label picks a block
    # of num_experts / router_domains experts, position hashes within it. Only "oracle" sees labels.
    router: Literal["learned", "hash", "oracle"] = "learned"
    router_domains: int = 2  # oracle only: number of domain labels (the manifest's domains)
    # Recompute each block in the backward pass instead of keeping its activations (torch.utils.checkpoint):
    # activation memory drops from ~depth blocks to one block plus the block inputs, for ~1/3 more compute.
    activation_checkpointing: bool = False

    def validate(self) -> None:
        check(self.patch > 0 and LATENT % self.patch == 0, "patch", f"must divide {LATENT}, got {self.patch}")
        check(self.dim > 0 and self.heads > 0 and self.dim % self.heads == 0, "dim",
              f"must be a positive multiple of heads={self.heads}, got {self.dim}")
        check(self.depth > 0, "depth", f"must be > 0, got {self.depth}")
        check(self.expert_dim > 0, "expert_dim", f"must be > 0, got {self.expert_dim}")
        check(self.num_experts >= 1, "num_experts", f"must be >= 1, got {self.num_experts}")
        check(self.ep_size >= 1 and self.num_experts % self.ep_size == 0, "ep_size",
              f"must divide model.num_experts={self.num_experts}, got {self.ep_size}")
        check(1 <= self.moe_every <= self.depth, "moe_every", f"must be in [1, depth={self.depth}], got {self.moe_every}")
        check(self.capacity_factor > 0 and self.eval_capacity_factor > 0, "capacity_factor", "must be > 0")
        check(self.min_capacity >= 0, "min_capacity", f"must be >= 0, got {self.min_capacity}")
        check(self.aux_loss_coef >= 0, "aux_loss_coef", f"must be >= 0, got {self.aux_loss_coef}")
        check(self.router == "learned" or self.kind == "moe", "router",
              f"{self.router} routing needs kind=moe, got kind={self.kind}")
        check(self.router != "oracle" or (self.router_domains >= 1 and self.num_experts % self.router_domains == 0),
              "router_domains", f"must divide num_experts={self.num_experts} (one expert block per domain), "
              f"got {self.router_domains}")

    @property
    def tokens(self) -> int:
        return (LATENT // self.patch) ** 3

    def is_moe_block(self, i: int) -> bool:
        return self.kind == "moe" and (i + 1) % self.moe_every == 0

    @property
    def active_ffn_dim(self) -> int:
        """FFN width one token passes through in an MoE block: its expert plus the shared one."""
        return self.expert_dim * (2 if self.shared_expert else 1)

    def dense_ffn_dim(self) -> int:
        if self.kind == "dense_total":
            return self.expert_dim * (self.num_experts + (1 if self.shared_expert else 0))
        return self.active_ffn_dim
