"""Discrete curl / divergence / gradient on a periodic N^3 box, in two matching pairs.

The tokenizer decodes a vector potential A and returns u = curl A; "divergence-free" only means
something together with the divergence operator it is measured with, so each curl has exactly
one matching divergence and the audit always names the pair:

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

Shapes: fields are [..., 3, X, Y, Z] vector or [..., X, Y, Z] scalar (any leading batch dims);
the box side is `length` (2π by default, as in the simulator), so dx = length / N.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Literal

import torch

Operator = Literal["spectral", "staggered"]
OPERATORS: tuple[str, ...] = ("spectral", "staggered")
BOX = 2 * math.pi


@lru_cache(maxsize=16)
def _wavenumbers(n: int, length: float, dtype: torch.dtype, device: str) -> tuple[torch.Tensor, ...]:
    """(kx [N,1,1], ky [1,N,1], kz [1,1,N//2+1]) with the Nyquist wavenumber zeroed."""
    scale = 2 * math.pi / length
    k_full = torch.fft.fftfreq(n, 1.0 / n, dtype=dtype, device=device) * scale
    k_half = torch.fft.rfftfreq(n, 1.0 / n, dtype=dtype, device=device) * scale
    k_full[n // 2] = 0.0
    k_half[-1] = 0.0
    return k_full.view(n, 1, 1), k_full.view(1, n, 1), k_half.view(1, 1, -1)


def _k(f: torch.Tensor, length: float) -> tuple[torch.Tensor, ...]:
    return _wavenumbers(f.shape[-1], float(length), f.dtype, str(f.device))


def _fft(f: torch.Tensor) -> torch.Tensor:
    return torch.fft.rfftn(f, dim=(-3, -2, -1))


def _ifft(fh: torch.Tensor, n: int) -> torch.Tensor:
    return torch.fft.irfftn(fh, s=(n, n, n), dim=(-3, -2, -1))


def _fwd(f: torch.Tensor, axis: int, dx: float) -> torch.Tensor:
    """Forward difference along grid axis 0/1/2 of the last three dims (periodic)."""
    dim = f.dim() - 3 + axis
    return (torch.roll(f, shifts=-1, dims=dim) - f) / dx


def curl(a_C: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """curl A: [..., 3, X, Y, Z] -> [..., 3, X, Y, Z], in A's dtype (the zero-mean part of u)."""
    n = a_C.shape[-1]
    ax, ay, az = a_C.unbind(-4)
    if operator == "spectral":
        kx, ky, kz = _k(a_C, length)
        hx, hy, hz = _fft(ax), _fft(ay), _fft(az)
        out = [1j * (ky * hz - kz * hy), 1j * (kz * hx - kx * hz), 1j * (kx * hy - ky * hx)]
        return torch.stack([_ifft(h, n) for h in out], dim=-4)
    dx = length / n
    return torch.stack([
        _fwd(az, 1, dx) - _fwd(ay, 2, dx),
        _fwd(ax, 2, dx) - _fwd(az, 0, dx),
        _fwd(ay, 0, dx) - _fwd(ax, 1, dx),
    ], dim=-4)


def divergence(u_C: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """div u: [..., 3, X, Y, Z] -> [..., X, Y, Z], the operator matching `curl`."""
    n = u_C.shape[-1]
    ux, uy, uz = u_C.unbind(-4)
    if operator == "spectral":
        kx, ky, kz = _k(u_C, length)
        return _ifft(1j * (kx * _fft(ux) + ky * _fft(uy) + kz * _fft(uz)), n)
    dx = length / n
    return _fwd(ux, 0, dx) + _fwd(uy, 1, dx) + _fwd(uz, 2, dx)


def gradient(u_C: torch.Tensor, operator: Operator, length: float = BOX) -> torch.Tensor:
    """∇u: [..., 3, X, Y, Z] -> [..., 3 (component), 3 (derivative axis), X, Y, Z]."""
    n = u_C.shape[-1]
    if operator == "spectral":
        uh = _fft(u_C)
        return torch.stack([_ifft(1j * k * uh, n) for k in _k(u_C, length)], dim=-4)
    dx = length / n
    return torch.stack([_fwd(u_C, axis, dx) for axis in range(3)], dim=-4)


def divergence_stats(u_BCXYZ: torch.Tensor, operator: Operator, length: float = BOX) -> dict[str, float]:
    """Divergence of a batch of fields with the matching operator, in the fields' dtype.

    max_abs = max |div u|; rel_max / rel_rms = max / rms of |div u| divided by the rms over the
    batch of |∇u| (Frobenius norm), which makes the numbers independent of units and grid.
    """
    div_BXYZ = divergence(u_BCXYZ, operator, length)
    grad_rms = float(gradient(u_BCXYZ, operator, length).pow(2).sum(dim=(-5, -4)).mean().sqrt())
    max_abs = float(div_BXYZ.abs().max())
    scale = max(grad_rms, 1e-300)
    return {"max_abs": max_abs, "rel_max": max_abs / scale,
            "rel_rms": float(div_BXYZ.pow(2).mean().sqrt()) / scale, "grad_rms": grad_rms}


def biot_savart(w_C: torch.Tensor, length: float = BOX) -> torch.Tensor:
    """Vector potential A = (-Δ)^-1 curl w (spectral, zero mean): [..., 3, X, Y, Z] -> same.

    With the spectral curl, curl A is the Leray projection of w minus its mean, so a decoder
    that predicts a velocity-like field w and returns u = mean(w) + curl A is exactly
    divergence-free whatever w is; with the staggered curl, u is divergence-free under the
    staggered divergence instead (A is just a potential; no property of A is needed).
    """
    n = w_C.shape[-1]
    kx, ky, kz = _k(w_C, length)
    k2 = kx**2 + ky**2 + kz**2
    inv_k2 = torch.where(k2 > 0, 1.0 / torch.where(k2 > 0, k2, torch.ones_like(k2)), torch.zeros_like(k2))
    hx, hy, hz = _fft(w_C.unbind(-4)[0]), _fft(w_C.unbind(-4)[1]), _fft(w_C.unbind(-4)[2])
    out = [1j * (ky * hz - kz * hy), 1j * (kz * hx - kx * hz), 1j * (kx * hy - ky * hx)]
    return torch.stack([_ifft(h * inv_k2, n) for h in out], dim=-4)
