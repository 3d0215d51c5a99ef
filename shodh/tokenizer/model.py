"""The divergence-free field tokenizer: 3D conv encoder, vector-potential decoder, checkpoint I/O.

Shape legend: B = batch, C = velocity components (3) or latent channels, X, Y, Z = field grid
(N each), x, y, z = latent grid (16 each), W = conv width.

Velocity parameterization (per field, in the domain's normalized units, see
`shodh.fields.normalization.Normalization`):
    v = U + curl A,    A = (-Δ)^-1 curl w (Biot–Savart),    U = mean of w
The network predicts a velocity-like field w [B, 3, N, N, N]; A is its vector potential and
U the mean-flow term (the curl of a periodic potential has zero mean; channel and porous flows
do not). A constant is divergence-free under any operator, so v is exactly on the
divergence-free manifold of the configured operator (shodh/fields/spectral.py) whatever the
network does; Biot–Savart makes the target of w the velocity itself (not a potential, whose curl
would amplify every high-wavenumber error by k), which is what makes training fast. Biot–Savart
and curl run in float64 at decode time, in float32 only inside the training loss. Physical
velocity is u = mean_d + scale_d * v with a per-domain vector mean_d and ONE scalar scale_d (a
per-component scale would break div u = 0).

Solids: the solid mask is an input of the encoder and of the decoder (folded into patches
like the velocity), and the loss covers the solid cells, so the decoder learns to cancel U
inside solids. We do not hard-multiply A by a solid indicator (u = curl(φA) + U): that makes
u exactly U inside every solid, and U cannot be dropped because a periodic box with net flux
through the pores needs a non-curl (constant) part. Leakage into solids is measured instead
(train.py logs decoded vs raw rms velocity in solid cells relative to fluid cells).

The mask is static per trajectory and stored with every raw frame, so whoever decodes a latent
(evaluation of predicted latents) reads `mask.npy` of the same trajectory's raw shard, and the
domain from its `meta.json` for the normalization.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from shodh.errors import DataError, ShodhError
from shodh.fields import spectral
from shodh.fields.normalization import Normalization
from shodh.io import read_json, sha256_file
from shodh.workspace import LATENT, tokenizer_dir

CHECKPOINT_FORMAT = "shodh-tokenizer-1"


def patch_size(grid: int) -> int:
    """Side p of the cubic patch folded into one latent voxel (N = 16 p)."""
    if grid < LATENT or grid % LATENT:
        raise ShodhError(f"grid {grid}: must be a multiple of 16 to reach a 16^3 latent")
    return grid // LATENT


def _conv3(width: int) -> nn.Conv3d:
    # Circular padding: the fields live on a periodic box.
    return nn.Conv3d(width, width, 3, padding=1, padding_mode="circular")


def _mlp(c_in: int, hidden: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(c_in, hidden), nn.GELU(), nn.Linear(hidden, c_out))


class Block(nn.Module):
    """Residual block on the 16^3 latent grid: a 3^3 conv (mixes neighbouring patches) and a
    pointwise linear layer. Input and output are channels-last, [B, x, y, z, W]."""

    def __init__(self, width: int):
        super().__init__()
        self.conv, self.linear = _conv3(width), nn.Linear(width, width)

    def forward(self, h_BxyzW: torch.Tensor) -> torch.Tensor:
        c = self.conv(rearrange(h_BxyzW, "b x y z w -> b w x y z"))
        return h_BxyzW + self.linear(F.gelu(rearrange(c, "b w x y z -> b x y z w")))


class TokenizerNet(nn.Module):
    """Encoder N^3 -> [C, 16, 16, 16]; decoder -> velocity-like field w (see `velocity`).

    All heavy work happens on the 16^3 grid, which keeps CPU training within minutes: each
    p^3 patch (3 velocity components + the solid mask) is folded into one latent voxel by
    einops, mixed pointwise (an MLP per patch, as matrix products) and across patches
    (residual 3^3 convs). The decoder mirrors it and unfolds p^3 patches of w.
    """

    def __init__(self, grid: int, channels: int, width: int, hidden: int, blocks: int):
        super().__init__()
        self.grid, self.p, self.channels = grid, patch_size(grid), channels
        patch = self.p**3
        self.enc_in = _mlp(4 * patch, hidden, width)
        self.enc_blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.enc_out = nn.Linear(width, channels)
        self.dec_in = _mlp(channels + patch, hidden, width)
        self.dec_blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.dec_out = _mlp(width, hidden, 3 * patch)

    def _fold(self, f_BCXYZ: torch.Tensor) -> torch.Tensor:
        p = self.p
        return rearrange(f_BCXYZ, "b c (x p) (y q) (z r) -> b x y z (c p q r)", p=p, q=p, r=p)

    def _unfold(self, f_Bxyzk: torch.Tensor) -> torch.Tensor:
        p = self.p
        return rearrange(f_Bxyzk, "b x y z (c p q r) -> b c (x p) (y q) (z r)", p=p, q=p, r=p)

    def encode(self, v_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor) -> torch.Tensor:
        """Normalized velocity [B, 3, N, N, N] + mask [B, N, N, N] -> latent [B, C, 16, 16, 16]."""
        m = mask_BXYZ.unsqueeze(1).to(v_BCXYZ.dtype)
        h = self.enc_blocks(self.enc_in(self._fold(torch.cat([v_BCXYZ, m], dim=1))))
        return rearrange(self.enc_out(h), "b x y z c -> b c x y z")

    def decode(self, z_Bcxyz: torch.Tensor, mask_BXYZ: torch.Tensor) -> torch.Tensor:
        """Latent + mask -> w [B, 3, N, N, N] in normalized units (not yet divergence-free)."""
        m = mask_BXYZ.unsqueeze(1).to(z_Bcxyz.dtype)
        z_Bxyzc = rearrange(z_Bcxyz, "b c x y z -> b x y z c")
        h = self.dec_blocks(self.dec_in(torch.cat([z_Bxyzc, self._fold(m)], dim=-1)))
        return self._unfold(self.dec_out(h))

    def forward(self, v_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoencode (one call, so DistributedDataParallel sees every parameter): (z, w)."""
        z = self.encode(v_BCXYZ, mask_BXYZ)
        return z, self.decode(z, mask_BXYZ)


def velocity(w_BCXYZ: torch.Tensor, operator: str) -> torch.Tensor:
    """v = mean(w) + curl A with A = Biot–Savart(w), in w's dtype: [B, 3, N, N, N] -> same,
    divergence-free under `operator` to round-off."""
    mean_BC111 = w_BCXYZ.mean(dim=(-3, -2, -1), keepdim=True)
    return mean_BC111 + spectral.curl(spectral.biot_savart(w_BCXYZ), operator)


def build_net(arch: dict, grid: int) -> TokenizerNet:
    """The network for an architecture dict (`TokenizerConfig.architecture()`) and field grid."""
    return TokenizerNet(grid, arch["channels"], arch["width"], arch["hidden"], arch["blocks"])


class Tokenizer:
    """A trained tokenizer: physical velocity <-> latent. All methods take a batch of one domain.

    encode(u [B,3,N,N,N] physical, mask [B,N,N,N], domain) -> z float32 [B,C,16,16,16]
    decode(z [B,C,16,16,16], mask [B,N,N,N], domain) -> u float64 [B,3,N,N,N] physical,
        divergence-free to round-off under `self.operator` (curl in float64)
    """

    def __init__(self, net: TokenizerNet, info: dict, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()
        self.info, self.device = info, torch.device(device)
        self.id: str = info["id"]
        self.grid: int = info["grid"]
        self.channels: int = info["config"]["channels"]
        self.operator: str = info["config"]["operator"]
        self.norm = Normalization.from_json(info["normalization"])

    @torch.no_grad()
    def encode(self, u_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor, domain: str) -> torch.Tensor:
        v = self.norm.normalize(u_BCXYZ.to(self.device, torch.float32), domain)
        return self.net.encode(v, mask_BXYZ.to(self.device, torch.float32))

    @torch.no_grad()
    def decode(self, z_Bcxyz: torch.Tensor, mask_BXYZ: torch.Tensor, domain: str) -> torch.Tensor:
        w = self.net.decode(z_Bcxyz.to(self.device, torch.float32), mask_BXYZ.to(self.device, torch.float32))
        v = velocity(w.double(), self.operator)
        return self.norm.denormalize(v, domain)


def load_tokenizer(root_or_dir: str | Path, device: str | torch.device = "cpu") -> Tokenizer:
    """Load ROOT/tokenizer/{tokenizer.pt, tokenizer.json}, verifying the weights' sha256."""
    folder = tokenizer_dir(root_or_dir)
    info = read_json(folder / "tokenizer.json", "tokenizer metadata (run `shodh train-tokenizer` first)")
    weights = folder / "tokenizer.pt"
    if not weights.exists():
        raise DataError(f"{weights}: tokenizer weights not found")
    if info.get("format") != CHECKPOINT_FORMAT:
        raise DataError(f"{folder / 'tokenizer.json'}: format {info.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    digest = sha256_file(weights)
    if digest != info.get("sha256"):
        raise DataError(f"{weights}: sha256 {digest[:16]} does not match tokenizer.json ({str(info.get('sha256'))[:16]})")
    net = build_net(info["config"], info["grid"])
    net.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return Tokenizer(net, info, device)
