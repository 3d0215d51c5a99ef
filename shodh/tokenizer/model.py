"""The divergence-free field tokenizer: 3D conv encoder, vector-potential decoder, checkpoint I/O.

Shape legend: B = batch, C = velocity components (3) or latent channels, X, Y, Z = field grid
(N each), x, y, z = latent grid (16 each), W = conv width.

Velocity parameterization (per field, in the domain's normalized units, see
`shodh.fields.normalization.Normalization`):
    v = U + curl A,    A = P_K (-Δ)^-1 curl w (Biot–Savart),    U = mean of w
with P_K the truncation to the modes |k_i| <= K, K the data's band limit (`band`, recorded in
tokenizer.json: the solver's 2/3 rule for simulated data, none for imported data), so decoded
fields hold no energy where the data has none (without it the decoder put 1e-9 .. 1e-7 where
the truth holds 1e-18). The truncation is a Fourier multiplier like the curl: v stays exactly
divergence-free.
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
from einops import rearrange, repeat
from torch import nn

from shodh.errors import DataError, ShodhError
from shodh.fields import spectral
from shodh.fields.metrics import shells_and_weights_XYH
from shodh.fields.normalization import Normalization
from shodh.io import read_json, sha256_file
from shodh.tokenizer.config import LOWPASS
from shodh.workspace import LATENT, tokenizer_dir

# 2: overlapping decoder windows, band-limited potential; 3: the low-pass latent channels;
# 4: the per-domain spectral gain of tokenizer.json applied on decode
CHECKPOINT_FORMAT = "shodh-tokenizer-4"


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


def window_taper(p: int) -> torch.Tensor:
    """The decoder's 1D blending weights over a window of 2p cells: sin²(π (i + ½) / (2p)).
    Windows overlap by p, and w_i + w_{i+p} = 1 (sin² + cos²), so the shifted tapers form a
    partition of unity: every cell is a convex blend of the two windows that cover it, and a
    window's weight falls to ~0 at its edges, where the next window takes over (no seams)."""
    i = torch.arange(2 * p, dtype=torch.float64)
    return torch.sin(torch.pi * (i + 0.5) / (2 * p)) ** 2


class TokenizerNet(nn.Module):
    """Encoder N^3 -> [C, 16, 16, 16]; decoder -> velocity-like field w (see `velocity`).

    Latent channels 0..2 are not learned: they are the normalized velocity spectrally resampled
    to the 16^3 grid (`spectral.resample`: its modes |k_i| < 8, exactly), and the decoder adds
    them back, resampled to N^3, to what it learns. The network then only has to encode and
    rebuild the scales finer than the latent grid (the other C - 3 channels): the large scales,
    most of the energy, are right from the first step instead of being learned slowly through
    the patch MLPs (README, Stage 2: at 300 steps VRMSE 0.246 -> 0.176 channel, 0.136 -> 0.080
    porous). The low-pass channels are local (16^3 samples of a smooth field), so latent
    patches stay localized for the transformer.

    All heavy work happens on the 16^3 grid, which keeps CPU training within minutes. Encoder:
    each p^3 patch of the field's high-pass part (the velocity minus its low-pass part, 3
    components + the solid mask) is folded into one latent voxel by einops, mixed pointwise
    (an MLP per patch, as matrix products) and across patches (residual 3^3 convs), and mapped
    to C - 3 channels. Decoder: the whole latent plus the folded mask, the same residual convs,
    then an MLP per latent voxel that emits a (2p)^3 window of w centred on its patch. The
    windows overlap their neighbours by half a window on every axis and are blended with the
    `window_taper` partition of unity (overlap-add), so each cell mixes the 8 windows that
    cover it and no patch boundary is special: a learned transposed convolution with kernel
    2p and stride p, whose kernel is tapered to ~0 at its edges. (Folding p^3 patches
    independently, as the first tokenizer did, printed a p-periodic block pattern on the
    decoded fields.)
    """

    def __init__(self, grid: int, channels: int, width: int, hidden: int, blocks: int,
                 band: int | None = None, operator: str = "spectral"):
        super().__init__()
        self.grid, self.p, self.channels = grid, patch_size(grid), channels
        self.band, self.operator = band, operator
        patch = self.p**3
        self.enc_in = _mlp(4 * patch, hidden, width)
        self.enc_blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.enc_out = nn.Linear(width, channels - LOWPASS)
        self.dec_in = _mlp(channels + patch, hidden, width)
        self.dec_blocks = nn.Sequential(*(Block(width) for _ in range(blocks)))
        self.dec_out = _mlp(width, hidden, 3 * 8 * patch)
        t = rearrange(window_taper(self.p).float(), "(a p) -> a p", a=2)
        taper = torch.einsum("ap,eq,fr->aefpqr", t, t, t)  # the same for the 3 components
        self.register_buffer("taper_K", repeat(taper, "a e f p q r -> (a e f c p q r)", c=3), persistent=False)

    def _fold(self, f_BCXYZ: torch.Tensor) -> torch.Tensor:
        p = self.p
        return rearrange(f_BCXYZ, "b c (x p) (y q) (z r) -> b x y z (c p q r)", p=p, q=p, r=p)

    def _overlap_add(self, win_Bxyzk: torch.Tensor) -> torch.Tensor:
        """Per-voxel tapered (2p)^3 windows [B, x, y, z, (a e f c p q r)] -> the blended field [B, 3, N, N, N].

        Window j covers cells [p j - p/2, p j + 3p/2) on each axis; its half a (e, f) in {0, 1}
        along x (y, z) lands on patch j + a. So the halves are summed one axis at a time, the
        second rolled by one patch (periodic box), in patch space; then one unfold to the grid
        and the half-patch shift that centres the windows."""
        p = self.p
        h = rearrange(win_Bxyzk, "b x y z (a e f k) -> a e f b x y z k", a=2, e=2, f=2)
        for _ in range(3):  # x, then y, then z: the summed axis is always dim 3 after unbinding
            # unbind, not h[0] / h[1]: each index's backward would zero-fill a full-size buffer
            first, second = h.unbind(0)
            h = first + torch.roll(second, 1, dims=3)
        out = rearrange(h, "b x y z (c p q r) -> b c (x p) (y q) (z r)", c=3, p=p, q=p, r=p)
        return torch.roll(out, shifts=(-(p // 2),) * 3, dims=(-3, -2, -1))

    def _windows(self, h_BxyzW: torch.Tensor) -> torch.Tensor:
        """The decoder's output MLP with the taper folded into its last layer (the same function
        as tapering its output, without a pass over the 8x larger window tensor)."""
        last = self.dec_out[-1]
        return F.linear(self.dec_out[:-1](h_BxyzW), last.weight * self.taper_K[:, None], last.bias * self.taper_K)

    def encode(self, v_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor) -> torch.Tensor:
        """Normalized velocity [B, 3, N, N, N] + mask [B, N, N, N] -> latent [B, C, 16, 16, 16]
        (channels 0..2: the velocity's low-pass part on the 16^3 grid)."""
        m = mask_BXYZ.unsqueeze(1).to(v_BCXYZ.dtype)
        low_B3xyz = spectral.resample(v_BCXYZ, LATENT)
        rest_BCXYZ = v_BCXYZ - spectral.resample(low_B3xyz, self.grid)
        h = self.enc_blocks(self.enc_in(self._fold(torch.cat([rest_BCXYZ, m], dim=1))))
        return torch.cat([low_B3xyz, rearrange(self.enc_out(h), "b x y z c -> b c x y z")], dim=1)

    def decode(self, z_Bcxyz: torch.Tensor, mask_BXYZ: torch.Tensor) -> torch.Tensor:
        """Latent + mask -> w [B, 3, N, N, N] in normalized units (not yet divergence-free): the
        low-pass channels resampled to N^3 plus the learned windows."""
        m = mask_BXYZ.unsqueeze(1).to(z_Bcxyz.dtype)
        z_Bxyzc = rearrange(z_Bcxyz, "b c x y z -> b x y z c")
        h = self.dec_blocks(self.dec_in(torch.cat([z_Bxyzc, self._fold(m)], dim=-1)))
        return self._overlap_add(self._windows(h)) + spectral.resample(z_Bcxyz[:, :LOWPASS], self.grid)

    @property
    def k_max(self) -> int:
        """The last shell the decoded fields can fill: the data's band, else N/2 (the shells
        the spectral gain and the spectrum metrics cover, 1..k_max)."""
        return self.band or self.grid // 2

    def velocity(self, w_BCXYZ: torch.Tensor) -> torch.Tensor:
        """`velocity` with this network's operator and band."""
        return velocity(w_BCXYZ, self.operator, self.band)

    def forward(self, v_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Autoencode (one call, so DistributedDataParallel sees every parameter): (z, w)."""
        z = self.encode(v_BCXYZ, mask_BXYZ)
        return z, self.decode(z, mask_BXYZ)


def velocity(w_BCXYZ: torch.Tensor, operator: str, band: int | None = None) -> torch.Tensor:
    """v = mean(w) + curl A with A = Biot–Savart(w) truncated to |k_i| <= band (all modes for
    None), in w's dtype: [B, 3, N, N, N] -> same, divergence-free under `operator` to round-off
    and free of energy past the band. The spectral operator takes the one-transform-pair form
    `spectral.solenoidal_part` (the same field)."""
    mean_BC111 = w_BCXYZ.mean(dim=(-3, -2, -1), keepdim=True)
    if operator == "spectral":
        return mean_BC111 + spectral.solenoidal_part(w_BCXYZ, band=band)
    return mean_BC111 + spectral.curl(spectral.biot_savart(w_BCXYZ, band=band), operator)


def gain_multiplier(gain_S: list[float] | torch.Tensor, n: int) -> torch.Tensor:
    """The spectral gain per rfft mode of an N^3 grid, float64 [N, N, H]: each mode gets the gain
    of its shell (round |k|; `gain_S` has one entry per shell of `fields.metrics.energy_spectrum_BS`,
    shell 0, the mean, has gain 1). Built once per tokenizer and domain, not per decode."""
    shells_XYH, _ = shells_and_weights_XYH(n, torch.device("cpu"))
    return torch.as_tensor(gain_S, dtype=torch.float64)[shells_XYH]


def gain_multipliers(spectral_gain: dict[str, list[float]], n: int,
                     device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """{domain: `gain_multiplier`} on `device`, for a tokenizer.json `spectral_gain` ({domain: per-shell gains})."""
    return {d: gain_multiplier(g, n).to(device) for d, g in spectral_gain.items()}


def equalize(v_BCXYZ: torch.Tensor, gain_XYH: torch.Tensor) -> torch.Tensor:
    """Each Fourier mode of v times its gain (`gain_multiplier`): a real Fourier multiplier like
    the curl, so v stays divergence-free and band-limited."""
    return spectral.ifft(spectral.fft(v_BCXYZ) * gain_XYH.to(v_BCXYZ.device, v_BCXYZ.dtype), v_BCXYZ.shape[-1])


def decode_physical(net: TokenizerNet, norm: Normalization, z_Bcxyz: torch.Tensor, mask_BXYZ: torch.Tensor,
                    domain: str, gains: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """Latent -> physical velocity float64 [B, 3, N, N, N]: the network's w, mean + curl A in
    float64, denormalized, times the domain's spectral gain (`gains`: {domain: `gain_multiplier`},
    when given). Every decode goes through here."""
    u = norm.denormalize(net.velocity(net.decode(z_Bcxyz.float(), mask_BXYZ.float()).double()), domain)
    # after denormalize (which names an unknown domain); the gain keeps the mean, so the order is free
    return u if gains is None else equalize(u, gains[domain])


def reconstruct(net: TokenizerNet, norm: Normalization, u_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor,
                domain: str, gains: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode + decode physical fields; returns (latent float32, velocity float64 physical)."""
    z = net.encode(norm.normalize(u_BCXYZ.float(), domain), mask_BXYZ.float())
    return z, decode_physical(net, norm, z, mask_BXYZ, domain, gains)


def build_net(arch: dict, grid: int) -> TokenizerNet:
    """The network for an architecture dict (`TokenizerConfig.architecture()` plus the data's
    `band`) and field grid."""
    return TokenizerNet(grid, arch["channels"], arch["width"], arch["hidden"], arch["blocks"],
                        arch.get("band"), arch["operator"])


class Tokenizer:
    """A trained tokenizer: physical velocity <-> latent. All methods take a batch of one domain.

    encode(u [B,3,N,N,N] physical, mask [B,N,N,N], domain) -> z float32 [B,C,16,16,16]
    decode(z [B,C,16,16,16], mask [B,N,N,N], domain) -> u float64 [B,3,N,N,N] physical,
        divergence-free to round-off under `self.operator` (curl in float64), with the domain's
        spectral gain (tokenizer.json `spectral_gain`, fit on the train split by train-tokenizer)
    """

    def __init__(self, net: TokenizerNet, info: dict, device: str | torch.device = "cpu"):
        self.net = net.to(device).eval()
        self.info, self.device = info, torch.device(device)
        self.id: str = info["id"]
        self.grid: int = info["grid"]
        self.channels: int = info["config"]["channels"]
        self.operator: str = info["config"]["operator"]
        self.norm = Normalization.from_json(info["normalization"])
        self.gains = gain_multipliers(info["spectral_gain"], self.grid, self.device)

    @torch.no_grad()
    def encode(self, u_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor, domain: str) -> torch.Tensor:
        v = self.norm.normalize(u_BCXYZ.to(self.device, torch.float32), domain)
        return self.net.encode(v, mask_BXYZ.to(self.device, torch.float32))

    @torch.no_grad()
    def decode(self, z_Bcxyz: torch.Tensor, mask_BXYZ: torch.Tensor, domain: str) -> torch.Tensor:
        return decode_physical(self.net, self.norm, z_Bcxyz.to(self.device), mask_BXYZ.to(self.device), domain,
                               self.gains)


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
