"""Spectral maths on the periodic N^3 box: wavenumbers, FFTs, Leray projection, discrete
curl / divergence / gradient pairs and the solenoidal projection matching each divergence,
Biot–Savart, resampling, and the solver's `SpectralGrid`.

Shape legend (the project's): B batch, C channels/components (3 velocity components or latent
channels), X Y Z grid axes (N each), H the halved rfft axis (N // 2 + 1), S spectral shells,
T frames of a trajectory. Physical fields are `*_CXYZ` / `*_XYZ` (any leading batch dims),
spectral coefficients `*h_CXYH` (unnormalized `torch.fft.rfftn` over the last three dims).
The box side is `length` (BOX = 2π by default, as in the simulator), so dx = length / N and the
wavenumbers are integers times 2π / length.

Discrete operators. The tokenizer decodes a vector potential A and returns u = curl A;
"divergence-free" only means something together with the divergence operator it is measured
with, so each curl has exactly one matching divergence and the audit always names the pair:

- `spectral`: derivatives are multiplications by i k in Fourier space (rfft), with the Nyquist
  wavenumber set to zero so that every derivative of a real field stays real. div(curl A) is
  k · (k × Â) = 0 mode by mode, so what is left is FFT round-off (~1e-16 relative). It matches
  the simulator's spectral fields exactly but is global: a sharp feature rings over the box.
- `staggered`: MAC / Yee staggering. A lives on cell edges, u on faces, div on cell centres;
  with the index convention used here every difference is the forward difference
  D_i f = (f[i+1] - f[i]) / dx (periodic). div(curl A) = Σ ε_ijk D_i D_j A_k vanishes because
  shifts commute, to round-off in any dtype. It is local (no ringing into solids) but measures
  the simulator's collocated spectral fields as percent-level divergent, which bounds how well
  it can reconstruct them.

The solver's `SpectralGrid` keeps the Nyquist wavenumber (its fields are dealiased, so the
Nyquist plane is empty anyway); the operators zero it.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch
import torch.nn.functional as F

Operator = Literal["spectral", "staggered"]
OPERATORS: tuple[str, ...] = ("spectral", "staggered")
BOX = 2 * math.pi
DIMS = (-3, -2, -1)  # the grid axes X, Y, Z of every field


# ---------------------------------------------------------------- wavenumbers and FFTs


def wavenumbers(n: int, length: float = BOX, dtype: torch.dtype = torch.float64, device="cpu",
                zero_nyquist: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(k_X [N], k_H [N // 2 + 1]): the full (fftfreq order, used for x and y) and halved (rfftfreq,
    z) wavenumber axes of an N-point periodic axis of side `length`, in radians per unit length.

    zero_nyquist sets the Nyquist wavenumber N/2 (even N only; odd N has none) to 0 on both axes.
    Cached per (n, length, dtype, device, zero_nyquist): the tensors are shared, never modify them.
    """
    return _wavenumbers(int(n), float(length), dtype, str(torch.device(device)), bool(zero_nyquist))


@lru_cache(maxsize=32)
def _wavenumbers(n: int, length: float, dtype: torch.dtype, device: str,
                 zero_nyquist: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale = 2 * math.pi / length
    k_X = torch.fft.fftfreq(n, 1.0 / n, dtype=dtype, device=device) * scale
    k_H = torch.fft.rfftfreq(n, 1.0 / n, dtype=dtype, device=device) * scale
    if zero_nyquist and n % 2 == 0:
        k_X[n // 2] = 0.0
        k_H[-1] = 0.0
    return k_X, k_H


def _k_axes(f: torch.Tensor, length: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The operators' (kx [N,1,1], ky [1,N,1], kz [1,1,H]) for field f, Nyquist zeroed."""
    k_X, k_H = wavenumbers(f.shape[-1], length, f.dtype, f.device, zero_nyquist=True)
    n = k_X.shape[0]
    return k_X.view(n, 1, 1), k_X.view(1, n, 1), k_H.view(1, 1, -1)


def fft(f_XYZ: torch.Tensor) -> torch.Tensor:
    """Real FFT over the last three dims: [..., X, Y, Z] -> complex [..., X, Y, H]."""
    return torch.fft.rfftn(f_XYZ, dim=DIMS)


def ifft(fh_XYH: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of `fft` onto an n^3 grid: complex [..., X, Y, H] -> real [..., n, n, n]."""
    return torch.fft.irfftn(fh_XYH, s=(n, n, n), dim=DIMS)


def _cross_k(kx, ky, kz, hx, hy, hz) -> list[torch.Tensor]:
    """The components of k × ĥ (times i this is the curl's symbol)."""
    return [ky * hz - kz * hy, kz * hx - kx * hz, kx * hy - ky * hx]


def leray_project(uh_CXYH: torch.Tensor, k_CXYH: torch.Tensor, k2_safe_XYH: torch.Tensor | None = None) -> torch.Tensor:
    """Leray projection onto divergence-free fields, û - k (k·û) / |k|²: [..., 3, X, Y, H] -> same.

    k2_safe_XYH is |k|² with its zero (k = 0) entries set to 1, so the mean mode is kept (its
    projection is the identity); computed from k_CXYH when not given.
    """
    if k2_safe_XYH is None:
        k2_XYH = (k_CXYH**2).sum(-4)
        k2_safe_XYH = torch.where(k2_XYH == 0, torch.ones_like(k2_XYH), k2_XYH)
    k_dot_u_XYH = (k_CXYH * uh_CXYH).sum(-4)
    return uh_CXYH - k_CXYH * (k_dot_u_XYH / k2_safe_XYH).unsqueeze(-4)


# ---------------------------------------------------------------- discrete operators


def _fwd(f: torch.Tensor, axis: int, dx: float) -> torch.Tensor:
    """Forward difference along grid axis 0/1/2 of the last three dims (periodic)."""
    dim = f.dim() - 3 + axis
    return (torch.roll(f, shifts=-1, dims=dim) - f) / dx


def curl(a_CXYZ: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """curl A: [..., 3, X, Y, Z] -> [..., 3, X, Y, Z], in A's dtype (the zero-mean part of u)."""
    n = a_CXYZ.shape[-1]
    ax, ay, az = a_CXYZ.unbind(-4)
    if operator == "spectral":
        kx, ky, kz = _k_axes(a_CXYZ, length)
        out = [1j * c for c in _cross_k(kx, ky, kz, fft(ax), fft(ay), fft(az))]
        return torch.stack([ifft(h, n) for h in out], dim=-4)
    dx = length / n
    return torch.stack([
        _fwd(az, 1, dx) - _fwd(ay, 2, dx),
        _fwd(ax, 2, dx) - _fwd(az, 0, dx),
        _fwd(ay, 0, dx) - _fwd(ax, 1, dx),
    ], dim=-4)


def divergence(u_CXYZ: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """div u: [..., 3, X, Y, Z] -> [..., X, Y, Z], the operator matching `curl`."""
    n = u_CXYZ.shape[-1]
    ux, uy, uz = u_CXYZ.unbind(-4)
    if operator == "spectral":
        kx, ky, kz = _k_axes(u_CXYZ, length)
        return ifft(1j * (kx * fft(ux) + ky * fft(uy) + kz * fft(uz)), n)
    dx = length / n
    return _fwd(ux, 0, dx) + _fwd(uy, 1, dx) + _fwd(uz, 2, dx)


def gradient(u_CXYZ: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """∇u: [..., 3, X, Y, Z] -> [..., 3 (component), 3 (derivative axis), X, Y, Z]."""
    n = u_CXYZ.shape[-1]
    if operator == "spectral":
        uh = fft(u_CXYZ)
        return torch.stack([ifft(1j * k * uh, n) for k in _k_axes(u_CXYZ, length)], dim=-4)
    dx = length / n
    return torch.stack([_fwd(u_CXYZ, axis, dx) for axis in range(3)], dim=-4)


def _spectral_grad_rms(u_BCXYZ: torch.Tensor, length: float) -> float:
    """rms over fields and space of |∇u| (Frobenius) for the spectral operator, by Parseval: the same
    number as `gradient(...)`, from one forward FFT instead of nine inverse ones (a 128^3 import
    measures every frame)."""
    n = u_BCXYZ.shape[-1]
    kx, ky, kz = _k_axes(u_BCXYZ, length)
    weight_H = torch.full_like(kz, 2.0)  # an rfft mode 0 < kz < N/2 stands for itself and its conjugate
    weight_H[..., 0] = 1.0
    if n % 2 == 0:
        weight_H[..., -1] = 1.0
    power = (fft(u_BCXYZ).abs() ** 2 * (kx**2 + ky**2 + kz**2) * weight_H).sum()
    fields = u_BCXYZ.numel() // (3 * n**3)
    return float((power / n**6 / fields).sqrt())


def divergence_stats(u_BCXYZ: torch.Tensor, operator: Operator, length: float = BOX) -> dict[str, float]:
    """Divergence of a batch of fields [B, 3, X, Y, Z] with the matching operator, in their dtype.

    max_abs = max |div u|; rel_max / rel_rms = max / rms of |div u| divided by the rms over the
    batch of |∇u| (Frobenius norm), which makes the numbers independent of units and grid.
    """
    div_BXYZ = divergence(u_BCXYZ, operator, length)
    grad_rms = _spectral_grad_rms(u_BCXYZ, length) if operator == "spectral" else \
        float(gradient(u_BCXYZ, operator, length).pow(2).sum(dim=(-5, -4)).mean().sqrt())
    max_abs = float(div_BXYZ.abs().max())
    scale = max(grad_rms, 1e-300)
    return {"max_abs": max_abs, "rel_max": max_abs / scale,
            "rel_rms": float(div_BXYZ.pow(2).mean().sqrt()) / scale, "grad_rms": grad_rms}


def solenoidal(u_CXYZ: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """The divergence-free part of u with respect to `operator`'s divergence: [..., 3, X, Y, Z] -> same.

    The orthogonal projection û - conj(d) (d·û) / |d|² with d the divergence's Fourier symbol per
    axis (i k, Nyquist zeroed, for `spectral`; (e^{ik dx} - 1) / dx, the forward difference, for
    `staggered`): `divergence(solenoidal(u), operator)` is round-off, the mean flow is kept, and
    u - solenoidal(u) is what a decoder that returns curl A + mean cannot represent. For
    `spectral` this is the Leray projection.
    """
    n = u_CXYZ.shape[-1]
    k_axes = _k_axes(u_CXYZ, length)
    if operator == "spectral":
        d_axes = [1j * k for k in k_axes]
    else:
        full_k = [wavenumbers(n, length, u_CXYZ.dtype, u_CXYZ.device)[i].view(shape)
                  for i, shape in ((0, (n, 1, 1)), (0, (1, n, 1)), (1, (1, 1, -1)))]
        d_axes = [(torch.exp(1j * k * (length / n)) - 1) / (length / n) for k in full_k]
    uh_C = list(fft(u_CXYZ).unbind(-4))
    d_dot_u = sum(d * h for d, h in zip(d_axes, uh_C))
    d2 = sum(d.abs() ** 2 for d in d_axes)
    d2_safe = torch.where(d2 == 0, torch.ones_like(d2), d2)  # the mean mode (and spectral Nyquist corners) kept
    return torch.stack([ifft(h - d.conj() * d_dot_u / d2_safe, n) for d, h in zip(d_axes, uh_C)], dim=-4)


def band_mask(n: int, band: int | None, dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """1 for the rfft modes of an N^3 grid with |k_i| <= band on every axis (integer wavenumbers
    of the 2π box), else 0: [N, N, H]. band None keeps every mode. The 2/3 rule of the solver
    keeps band = (N - 1) // 3. Cached: the tensor is shared, never modify it."""
    return _band_mask(int(n), None if band is None else int(band), dtype, str(torch.device(device)))


@lru_cache(maxsize=32)
def _band_mask(n: int, band: int | None, dtype: torch.dtype, device: str) -> torch.Tensor:
    k_X, k_H = wavenumbers(n, BOX, torch.float64, device)
    if band is None:
        return torch.ones(n, n, n // 2 + 1, dtype=dtype, device=device)
    keep_X, keep_H = k_X.abs() <= band, k_H <= band
    return (keep_X.view(n, 1, 1) & keep_X.view(1, n, 1) & keep_H.view(1, 1, -1)).to(dtype)


def biot_savart(w_CXYZ: torch.Tensor, length: float = BOX, band: int | None = None) -> torch.Tensor:
    """Vector potential A = (-Δ)^-1 curl w (spectral, zero mean): [..., 3, X, Y, Z] -> same,
    truncated to the modes |k_i| <= band (`band_mask`) when band is given.

    With the spectral curl, curl A is the Leray projection of w minus its mean, so a decoder
    that predicts a velocity-like field w and returns u = mean(w) + curl A is exactly
    divergence-free whatever w is; with the staggered curl, u is divergence-free under the
    staggered divergence instead (A is just a potential; no property of A is needed). Both
    curls are Fourier multipliers, so a band-limited A gives a band-limited u.
    """
    n = w_CXYZ.shape[-1]
    kx, ky, kz = _k_axes(w_CXYZ, length)
    k2_XYH = kx**2 + ky**2 + kz**2
    inv_k2_XYH = torch.where(k2_XYH > 0, 1.0 / torch.where(k2_XYH > 0, k2_XYH, torch.ones_like(k2_XYH)),
                             torch.zeros_like(k2_XYH))
    if band is not None:
        inv_k2_XYH = inv_k2_XYH * band_mask(n, band, inv_k2_XYH.dtype, inv_k2_XYH.device)
    wx, wy, wz = w_CXYZ.unbind(-4)
    out = [1j * c for c in _cross_k(kx, ky, kz, fft(wx), fft(wy), fft(wz))]
    return torch.stack([ifft(h * inv_k2_XYH, n) for h in out], dim=-4)


def solenoidal_part(w_CXYZ: torch.Tensor, length: float = BOX, band: int | None = None) -> torch.Tensor:
    """curl biot_savart(w) under the spectral operator, in one transform pair: the Leray
    projection of w without its mean (k' the operators' wavenumbers, Nyquist zeroed:
    -k' × (k' × ŵ) / |k'|² = ŵ - k' (k'·ŵ) / |k'|², and 0 where k' = 0), truncated to `band`.
    Identical to `curl(biot_savart(w, length, band), "spectral")` at half the FFTs."""
    n = w_CXYZ.shape[-1]
    kx, ky, kz = _k_axes(w_CXYZ, length)
    k2_XYH = kx**2 + ky**2 + kz**2
    keep_XYH = (k2_XYH > 0).to(k2_XYH.dtype) * band_mask(n, band, k2_XYH.dtype, k2_XYH.device)
    inv_k2_XYH = keep_XYH / torch.where(k2_XYH > 0, k2_XYH, torch.ones_like(k2_XYH))
    hx, hy, hz = (fft(c) for c in w_CXYZ.unbind(-4))
    k_dot_h = (kx * hx + ky * hy + kz * hz) * inv_k2_XYH
    return torch.stack([ifft(h * keep_XYH - k * k_dot_h, n) for h, k in ((hx, kx), (hy, ky), (hz, kz))], dim=-4)


# ---------------------------------------------------------------- resampling


def resample(u_XYZ: torch.Tensor, n_out: int) -> torch.Tensor:
    """Spectral interpolation of a periodic field [..., X, Y, Z] (any sides; cubic in the solver)
    to [..., n_out, n_out, n_out], in its dtype, by zero-padding or truncating the rfft modes.

    Keeps exactly the modes with |k_i| < min(N_i, n_out) / 2 on every axis, i.e. all modes the
    smaller grid holds except an even grid's Nyquist plane (k_i = ±M/2 for M = min(N_i, n_out)),
    which is dropped: it is a single real coefficient standing for both ±M/2, so it has no
    unique counterpart on the other grid. Hence the result is exact (up to FFT round-off) for
    fields band-limited below both grids' Nyquist (dealiased solver states are), and
    n_out == N is not the identity but removes the Nyquist plane.
    """
    sides = u_XYZ.shape[-3:]
    hx, hy, hz = ((min(n, n_out) + 1) // 2 for n in sides)  # modes 0 .. h-1 and -(h-1) .. -1 are kept
    uh = fft(u_XYZ)
    out = torch.zeros((*u_XYZ.shape[:-3], n_out, n_out, n_out // 2 + 1), dtype=uh.dtype, device=uh.device)

    def pairs(n: int, half: int) -> list[tuple[slice, slice]]:
        """(source, destination) index ranges of the non-negative and the negative wavenumbers."""
        return [(slice(0, half), slice(0, half)), (slice(n - half + 1, n), slice(n_out - half + 1, n_out))]

    for src_x, dst_x in pairs(sides[0], hx):
        for src_y, dst_y in pairs(sides[1], hy):
            out[..., dst_x, dst_y, :hz] = uh[..., src_x, src_y, :hz]
    return ifft(out, n_out) * (n_out**3 / math.prod(sides))


def resample_mask(mask_XYZ: torch.Tensor, n: int) -> torch.Tensor:
    """Nearest-neighbour resampling of a solid mask [X, Y, Z] to float32 [n, n, n]."""
    return F.interpolate(mask_XYZ.float()[None, None], size=(n, n, n), mode="nearest")[0, 0]


# ---------------------------------------------------------------- the solver's grid


class SpectralGrid:
    """Wavenumbers, FFTs and spectral differential operators on an N^3 periodic grid (the solver's).

    k_CXYH [3, N, N, H] wavenumber vectors (Nyquist kept), k2_XYH = |k|², k2_safe_XYH (k = 0
    entry set to 1), dealias_XYH the 2/3-rule mask (|k_i| < N/3), x_CXYZ the grid points.
    """

    def __init__(self, n: int, length: float = BOX, dtype=torch.float64, device="cpu"):
        self.n, self.length, self.dtype, self.device = n, length, dtype, torch.device(device)
        self.dx = length / n
        scale = 2 * math.pi / length
        k_X, k_H = wavenumbers(n, length, dtype, device)
        kx, ky, kz = torch.meshgrid(k_X, k_X, k_H, indexing="ij")
        self.k_CXYH = torch.stack([kx, ky, kz])
        self.k2_XYH = (self.k_CXYH**2).sum(0)
        # The k = 0 mode is never divided: its projection is the identity (mean flow kept).
        self.k2_safe_XYH = torch.where(self.k2_XYH == 0, torch.ones_like(self.k2_XYH), self.k2_XYH)
        cutoff = n / 3 * scale  # 2/3 rule: keep |k_i| < N/3
        keep = (kx.abs() < cutoff) & (ky.abs() < cutoff) & (kz.abs() < cutoff)
        self.dealias_XYH = keep.to(dtype)
        axis = torch.arange(n, dtype=dtype, device=device) * self.dx
        self.x_CXYZ = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))

    @property
    def complex_dtype(self):
        return torch.complex128 if self.dtype == torch.float64 else torch.complex64

    def fft(self, f_XYZ: torch.Tensor) -> torch.Tensor:
        return fft(f_XYZ)

    def ifft(self, fh_XYH: torch.Tensor) -> torch.Tensor:
        return ifft(fh_XYH, self.n)

    def project(self, uh_CXYH: torch.Tensor) -> torch.Tensor:
        """Leray projection onto divergence-free fields: û - k (k·û) / |k|²."""
        return leray_project(uh_CXYH, self.k_CXYH, self.k2_safe_XYH)

    def random_solenoidal(self, kmax: float, rms: float, generator: torch.Generator) -> torch.Tensor:
        """A random divergence-free field [3, N, N, N] with energy in |k| <= kmax, scaled to the given rms."""
        shape = self.k_CXYH.shape
        # Drawn on the CPU so that a seed gives the same field on every device.
        noise = torch.randn(shape, dtype=self.dtype, generator=generator, device="cpu")
        phase = torch.randn(shape, dtype=self.dtype, generator=generator, device="cpu")
        uh_CXYH = torch.complex(noise, phase).to(self.device) * (self.k2_XYH <= kmax**2)
        u_CXYZ = self.ifft(self.project(uh_CXYH) * self.dealias_XYH)  # irfftn enforces Hermitian symmetry
        u_CXYZ = u_CXYZ - u_CXYZ.mean(dim=DIMS, keepdim=True)
        return u_CXYZ * (rms / u_CXYZ.pow(2).mean().sqrt().clamp_min(1e-30))
