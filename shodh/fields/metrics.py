"""Pure metric functions for evaluating predicted flow fields against the truth.

Shape legend (the project's): B batch, C channels/components (3 velocity components or latent
channels), X Y Z grid axes (N each), H the halved rfft axis (N // 2 + 1), S spectral shells,
T frames of a trajectory. Fields live on the periodic box [0, 2π)^3, so wavenumbers are integers.

Error metrics follow The Well (Ohana et al., 2024), per sample and per component over space:
    MSE   = mean_x (p - t)^2
    nRMSE = sqrt( mean_x (p - t)^2 / (mean_x t^2 + eps) )
    VRMSE = sqrt( mean_x (p - t)^2 / (var_x t + eps) ),  var_x with Bessel's correction (1 / (n - 1))
exactly as `the_well.benchmark.metrics` computes them (torch.std's default is the unbiased
estimate; eps = 1e-7 inside the root; tests/test_import.py checks against its code).
VRMSE = sqrt((n - 1) / n) ≈ 1 for a prediction that is the spatial mean of the truth (n grid
points), so it says how much of the field's variation a model explains, independent of the
mean flow; nRMSE also credits the mean.
The whole box is scored, solid cells included (the truth is ~0 there, leakage counts as error).
"""

from __future__ import annotations

import torch

from shodh.fields.spectral import fft, wavenumbers

EPS = 1e-7  # The Well's epsilon: keeps a constant truth from dividing by zero
BANDS = ("low", "mid", "high")
SPECTRAL_FLOOR = 1e-6  # band energy floor, as a fraction of the truth's fluctuation energy


def mse_B(pred_BCXYZ: torch.Tensor, true_BCXYZ: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample: [B, C, X, Y, Z] x2 -> [B] (over components and space)."""
    return (pred_BCXYZ - true_BCXYZ).pow(2).mean(dim=(-4, -3, -2, -1))


def nrmse_BC(pred_BCXYZ: torch.Tensor, true_BCXYZ: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The Well's nRMSE per sample and component: [B, C, X, Y, Z] x2 -> [B, C]."""
    err_BC = (pred_BCXYZ - true_BCXYZ).pow(2).mean(dim=(-3, -2, -1))
    return (err_BC / (true_BCXYZ.pow(2).mean(dim=(-3, -2, -1)) + eps)).sqrt()


def vrmse_BC(pred_BCXYZ: torch.Tensor, true_BCXYZ: torch.Tensor, eps: float = EPS) -> torch.Tensor:
    """The Well's VRMSE per sample and component: [B, C, X, Y, Z] x2 -> [B, C]."""
    err_BC = (pred_BCXYZ - true_BCXYZ).pow(2).mean(dim=(-3, -2, -1))
    var_BC = true_BCXYZ.var(dim=(-3, -2, -1), correction=1)
    return (err_BC / (var_BC + eps)).sqrt()


def shells_and_weights_XYH(n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Shell index round(|k|) [X, Y, H] int64 of every rfft mode of an N^3 grid, and its weight
    [X, Y, H]: 2 for 0 < kz < N/2 (the mode stands for itself and its conjugate), else 1."""
    k_X, k_H = wavenumbers(n, dtype=torch.float64, device=device)  # box 2π: integer wavenumbers
    kx, ky, kz = torch.meshgrid(k_X, k_X, k_H, indexing="ij")
    shells_XYH = (kx**2 + ky**2 + kz**2).sqrt().round().long()
    weights_XYH = torch.full_like(kz, 2.0)
    weights_XYH[..., 0] = 1.0
    if n % 2 == 0:
        weights_XYH[..., -1] = 1.0
    return shells_XYH, weights_XYH


def energy_spectrum_BS(u_BCXYZ: torch.Tensor, modes_XYH: torch.Tensor | None = None) -> torch.Tensor:
    """Shell-summed kinetic energy E(k) = Σ_{|k'| ≈ k} ½ |û(k')|² / N^6: [B, 3, X, Y, Z] -> [B, S].

    Normalized so that Σ_k E(k) = ½ mean_x |u|² (Parseval); shell 0 is the mean flow, S - 1 the
    largest shell of the cube's corners (round(√3 N/2)). Uses the real FFT (half the work).
    modes_XYH (0/1 per rfft mode) restricts the sums to a subset of the modes."""
    n = u_BCXYZ.shape[-1]
    shells_XYH, weights_XYH = shells_and_weights_XYH(n, u_BCXYZ.device)
    if modes_XYH is not None:
        weights_XYH = weights_XYH * modes_XYH
    uh_BCXYH = fft(u_BCXYZ)
    power_BXYH = 0.5 * uh_BCXYH.abs().pow(2).sum(dim=-4) * weights_XYH / n**6
    out_BS = power_BXYH.new_zeros(power_BXYH.shape[0], int(shells_XYH.max()) + 1)
    return out_BS.index_add_(1, shells_XYH.flatten(), power_BXYH.flatten(1))


def band_edges(n: int) -> tuple[float, float]:
    """Edges between the low/mid/high bands: shells 1 .. N/2 split in thirds on a log scale
    (N=16: 2, 4; N=64: 3.2, 10.1), so each band spans the same ratio of scales."""
    k_max = n / 2
    return k_max ** (1 / 3), k_max ** (2 / 3)


def band_of_S(shell_count: int, n: int) -> torch.Tensor:
    """Band index per shell (0 low, 1 mid, 2 high, -1 for the mean flow k = 0): [S] int64."""
    lo, hi = band_edges(n)
    k_S = torch.arange(shell_count, dtype=torch.float64)
    band_S = (k_S >= lo).long() + (k_S >= hi).long()
    band_S[0] = -1
    return band_S


def spectral_error_B3(pred_BCXYZ: torch.Tensor, true_BCXYZ: torch.Tensor) -> torch.Tensor:
    """Binned relative spectral error per sample: [B, C, X, Y, Z] x2 -> [B, 3] (low, mid, high).

    For each band, Σ E_err(k) / Σ E_true(k) over its shells, with E the energy spectrum of the
    error field p - t and of the truth: 0 for a perfect prediction, 1 when the error carries as
    much energy as the truth at those scales (e.g. a prediction of zero). Shells past N/2 (the
    corners of the cube) count as high; the mean flow (k = 0) is excluded. A band in which the
    truth holds less than SPECTRAL_FLOOR of its fluctuation energy is divided by that floor
    instead, so a nearly empty band (a smooth field's high wavenumbers) cannot blow up."""
    n = true_BCXYZ.shape[-1]
    err_BS = energy_spectrum_BS(pred_BCXYZ - true_BCXYZ)
    true_BS = energy_spectrum_BS(true_BCXYZ)
    band_S = band_of_S(true_BS.shape[-1], n).to(true_BS.device)
    floor_B = SPECTRAL_FLOOR * true_BS[:, 1:].sum(-1) + 1e-300
    out = []
    for b in range(len(BANDS)):
        sel_S = band_S == b
        out.append(err_BS[:, sel_S].sum(-1) / torch.maximum(true_BS[:, sel_S].sum(-1), floor_B))
    return torch.stack(out, dim=-1)
