"""Model configuration (section `model`), kept free of torch/DeepSpeed imports so loading a config is cheap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shodh.errors import check
from shodh.workspace import LATENT


@dataclass
class RouterConfig:
    """Section `model.router`: how the MoE layers pick each token's expert (README "The router").

    kind: learned = W_g·x (the model); hash = each token position goes to a fixed, balanced, seeded
    expert; oracle = the sample's domain label picks a block of num_experts / domains experts, the
    position hashes within it (study controls; only "oracle" ever sees a label).
    The rest applies to kind=learned. balance: switch = DeepSpeed's Switch loss on this micro-batch's
    tokens; global = the same loss with the expert load counted over the global batch (all ranks);
    bias = loss-free balancing (a per-expert bias on the selection logits, nudged by bias_rate toward
    uniform load after every optimizer step); none. z_loss: ST-MoE router z-loss coefficient.
    scope: token = one decision per token; sample = one decision per sample from its mean-pooled
    tokens, all of its tokens go to that expert and a sample over capacity is dropped whole.
    """

    kind: Literal["learned", "hash", "oracle"] = "learned"
    domains: int = 2  # oracle only: number of domain labels (the manifest's domains)
    balance: Literal["switch", "global", "bias", "none"] = "switch"
    bias_rate: float = 1e-3  # γ of bias balancing: b_e += γ·sign(mean load - load_e) per optimizer step
    z_loss: float = 0.0  # loss += z_loss · Σ_layers mean(logsumexp(router logits)^2)
    scope: Literal["token", "sample"] = "token"

    def validate(self) -> None:
        check(self.domains >= 1, "domains", f"must be >= 1, got {self.domains}")
        check(self.bias_rate > 0, "bias_rate", f"must be > 0, got {self.bias_rate}")
        check(self.z_loss >= 0, "z_loss", f"must be >= 0, got {self.z_loss}")
        fixed = self.kind != "learned"
        check(not fixed or (self.balance == "switch" and self.z_loss == 0 and self.scope == "token"), "kind",
              f"a {self.kind} router is fixed: balance, z_loss and scope apply to kind=learned only")


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
    aux_loss_coef: float = 0.01  # loss = mse + coef * Σ_layers balance loss (+ router.z_loss * Σ z-loss)
    router: RouterConfig = field(default_factory=RouterConfig)
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
        check(self.router.kind == "learned" or self.kind == "moe", "router.kind",
              f"{self.router.kind} routing needs kind=moe, got kind={self.kind}")
        check(self.router.kind != "oracle" or self.num_experts % self.router.domains == 0,
              "router.domains", f"must divide num_experts={self.num_experts} (one expert block per domain), "
              f"got {self.router.domains}")

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
