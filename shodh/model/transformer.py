"""The latent transformer: z_t [B, C, 16, 16, 16] -> z_{t+1} = z_t + Δ, with MoE or dense FFNs.

z is cut into p^3-voxel patches (one token each), embedded linearly, given a learned 3D
position embedding (sum of one table per axis), passed through L pre-norm blocks (attention
and FFN) and projected back to patches. The FFN of block i is a DeepSpeed Top-1 MoE when
`kind == "moe"` and (i + 1) % moe_every == 0, else a dense MLP. The dense baselines put dense
MLPs everywhere: `dense_active` at the MoE's active width, `dense_total` at its total width.
The domain label is never an input: whatever specialization the router finds, it finds from z.
(Sole exception, a study control: model.router.kind=oracle hands it to the router, nothing else.)

Shape legend (the project's, shodh/__init__.py): B batch, C latent channels, X/Y/Z latent grid (16 each),
N tokens per sample, P = C*p^3 values per patch, D model width, M heads, A head width, F FFN width.
"""

from __future__ import annotations

import math

import einops
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from shodh.errors import ShodhError
from shodh.model import params
from shodh.model.config import ModelConfig
from shodh.model.moe import MLP, MoEFFN, RouterLoss, init_mlp, no_router_loss
from shodh.workspace import LATENT


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x_BND: torch.Tensor) -> torch.Tensor:
        q_BMNA, k_BMNA, v_BMNA = einops.rearrange(self.qkv(x_BND), "b n (three m a) -> three b m n a",
                                                  three=3, m=self.heads)
        o_BMNA = F.scaled_dot_product_attention(q_BMNA, k_BMNA, v_BMNA)
        return self.proj(einops.rearrange(o_BMNA, "b m n a -> b n (m a)"))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int, expert_offset: int, seed: int):
        super().__init__()
        std, out_std = 0.02, 0.02 / math.sqrt(2 * cfg.depth)  # GPT-2: residual writes shrink with depth
        self.norm1, self.norm2 = nn.LayerNorm(cfg.dim), nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg.dim, cfg.heads)
        params.tag(self.norm1, "norm")
        params.tag(self.norm2, "norm")
        params.tag(self.attn, "attention")
        with torch.no_grad():
            self.attn.qkv.weight.normal_(0.0, std)
            self.attn.proj.weight.normal_(0.0, out_std)
        if cfg.is_moe_block(index):
            self.ffn: nn.Module = MoEFFN(
                cfg.dim, cfg.expert_dim, cfg.num_experts, cfg.ep_size, cfg.capacity_factor,
                cfg.eval_capacity_factor, cfg.min_capacity,
                None if cfg.noisy_gate_policy == "none" else cfg.noisy_gate_policy,
                cfg.shared_expert, index, expert_offset, seed, std, out_std, router=cfg.router, tokens=cfg.tokens)
        else:
            self.ffn = MLP(cfg.dim, cfg.dense_ffn_dim())
            init_mlp(self.ffn, std, out_std)
            params.tag(self.ffn, "dense_ffn")

    def forward(self, x_BND: torch.Tensor, domain_B: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterLoss | None]:
        x_BND = x_BND + self.attn(self.norm1(x_BND))
        if isinstance(self.ffn, MoEFFN):
            y_BND, router_loss = self.ffn(self.norm2(x_BND), domain_B)
            return x_BND + y_BND, router_loss
        return x_BND + self.ffn(self.norm2(x_BND)), None


class LatentTransformer(nn.Module):
    """Next-latent predictor. `expert_offset`: this rank's first global expert (ep_rank * E / ep_size)."""

    def __init__(self, cfg: ModelConfig, channels: int, seed: int = 0, expert_offset: int = 0):
        super().__init__()
        self.cfg, self.channels = cfg, channels
        n = LATENT // cfg.patch
        self.n_axis = n
        patch_values = channels * cfg.patch**3
        self.embed = nn.Linear(patch_values, cfg.dim)
        self.pos_x, self.pos_y, self.pos_z = (nn.Parameter(torch.randn(n, cfg.dim) * 0.02) for _ in range(3))
        self.blocks = nn.ModuleList(Block(cfg, i, expert_offset, seed) for i in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, patch_values)
        with torch.no_grad():
            self.embed.weight.normal_(0.0, 0.02)
            self.embed.bias.zero_()
            self.head.weight.normal_(0.0, 0.02)
            self.head.bias.zero_()
        params.tag(self.embed, "embedding")
        for table in (self.pos_x, self.pos_y, self.pos_z):
            params.tag(table, "position")
        params.tag(self.norm, "norm")
        params.tag(self.head, "head")

    def position_ND(self) -> torch.Tensor:
        return einops.rearrange(self.pos_x[:, None, None] + self.pos_y[None, :, None] + self.pos_z[None, None, :],
                                "x y z d -> (x y z) d")

    def forward(self, z_BCXYZ: torch.Tensor, domain_B: torch.Tensor | None = None) -> tuple[torch.Tensor, RouterLoss]:
        """Returns (z_next [B, C, 16, 16, 16], the router's losses summed over MoE layers (0 for dense
        models); train on mse + router_loss.weighted(cfg)).
        domain_B [B]: domain labels, accepted only by model.router.kind=oracle (its router alone reads them)."""
        oracle = self.cfg.router.kind == "oracle"
        if (domain_B is not None) != oracle:
            raise ShodhError(f"model.router.kind={self.cfg.router.kind}: domain labels are "
                             f"{'required' if oracle else 'never a model input'}")
        p = self.cfg.patch
        patches_BNP = einops.rearrange(z_BCXYZ, "b c (x p) (y q) (z r) -> b (x y z) (p q r c)", p=p, q=p, r=p)
        x_BND = self.embed(patches_BNP) + self.position_ND()
        router_loss = no_router_loss(z_BCXYZ)
        for block in self.blocks:
            if self.cfg.activation_checkpointing and self.training and torch.is_grad_enabled():
                # Non-reentrant checkpointing restores the RNG state for the recompute, so Random Token
                # Selection drops the same tokens twice and the gradients equal the stored-activation ones;
                # the recompute repeats the block's all-to-alls on every expert-parallel rank alike.
                x_BND, block_loss = torch.utils.checkpoint.checkpoint(block, x_BND, domain_B, use_reentrant=False)
            else:
                x_BND, block_loss = block(x_BND, domain_B)
            if block_loss is not None:
                router_loss = router_loss + block_loss
        delta_BNP = self.head(self.norm(x_BND))
        n = self.n_axis
        delta_BCXYZ = einops.rearrange(delta_BNP, "b (x y z) (p q r c) -> b c (x p) (y q) (z r)",
                                       x=n, y=n, z=n, p=p, q=p, r=p)
        return z_BCXYZ + delta_BCXYZ.to(z_BCXYZ.dtype), router_loss


def forward_flops_per_token(cfg: ModelConfig, channels: int) -> int:
    """Matmul FLOPs of one forward pass per token (2 per multiply-add), as routed at capacity 1.0:
    embed/head, attention projections and scores, each FFN at its active width, gates, and the
    residual-MoE coefficient. Training costs 3x this (forward + 2x backward)."""
    D, N, P = cfg.dim, cfg.tokens, channels * cfg.patch**3
    flops = 2 * P * D * 2  # embed + head
    for i in range(cfg.depth):
        flops += 2 * D * 3 * D + 2 * D * D + 2 * 2 * N * D  # qkv, proj, q·k and p·v
        if cfg.is_moe_block(i):
            flops += 2 * 2 * D * cfg.active_ffn_dim + 2 * D * cfg.num_experts
            flops += 2 * D * 2 if cfg.shared_expert else 0
        else:
            flops += 2 * 2 * D * cfg.dense_ffn_dim()
    return flops
