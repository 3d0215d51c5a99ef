"""Evaluation metrics on analytic cases: exact answers that break if a definition is wrong."""

import math

import pytest
import torch

from shodh.eval.routing import bifurcation_KL, expert_given_domain_KLE
from shodh.fields import metrics as M
from shodh.fields import spectral

N = 16


def _field(seed: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, N, N, N, generator=g, dtype=torch.float64) + 0.5


def _mode(kx: int, amplitude: float = 1.0) -> torch.Tensor:
    """u = (0, amplitude * sin(kx x), 0): all energy in shell |k| = kx, [1, 3, N, N, N]."""
    x = torch.arange(N, dtype=torch.float64) * 2 * math.pi / N
    u = torch.zeros(1, 3, N, N, N, dtype=torch.float64)
    u[0, 1] = amplitude * torch.sin(kx * x)[:, None, None]
    return u


def test_perfect_prediction_scores_zero():
    u = _field(0)
    assert M.mse_B(u, u).abs().max() == 0
    assert M.vrmse_BC(u, u).abs().max() == 0
    assert M.nrmse_BC(u, u).abs().max() == 0
    assert M.spectral_error_B3(u, u).abs().max() == 0


def test_vrmse_of_spatial_mean_is_one_and_nrmse_of_zero_is_one():
    u = _field(1)
    mean = u.mean(dim=(-3, -2, -1), keepdim=True).expand_as(u)
    # The Well's variance is the unbiased one: the spatial mean scores sqrt((n - 1) / n), not 1.
    n = N**3
    assert torch.allclose(M.vrmse_BC(mean, u), torch.full((2, 3), math.sqrt((n - 1) / n), dtype=torch.float64), atol=1e-9)
    assert torch.allclose(M.nrmse_BC(torch.zeros_like(u), u), torch.ones(2, 3, dtype=torch.float64), atol=1e-6)
    # an error of half the fluctuation: VRMSE 0.5 exactly (up to eps)
    half = mean + 0.5 * (u - mean)
    assert torch.allclose(M.vrmse_BC(half, u), torch.full((2, 3), 0.5 * math.sqrt((n - 1) / n), dtype=torch.float64), atol=1e-9)
    assert torch.allclose(M.mse_B(half, u), 0.25 * (u - mean).pow(2).mean(dim=(1, 2, 3, 4)))


def test_energy_spectrum_parseval_and_shell():
    u = _field(2)
    E_BS = M.energy_spectrum_BS(u)
    assert torch.allclose(E_BS.sum(-1), 0.5 * u.pow(2).sum(1).mean(dim=(1, 2, 3)))
    E_S = M.energy_spectrum_BS(_mode(3, amplitude=2.0))[0]
    assert torch.isclose(E_S[3], torch.tensor(0.5 * 2.0**2 / 2, dtype=torch.float64))  # ½ <(2 sin)²> = 1
    assert E_S.sum() - E_S[3] < 1e-20


def test_spectral_error_lands_in_its_band():
    lo, hi = M.band_edges(N)
    assert (lo, hi) == pytest.approx((2.0, 4.0))
    truth = _mode(1) + _mode(3) + _mode(6)  # one mode per band: low, mid, high
    err = M.spectral_error_B3(truth + 0.5 * _mode(3), truth)[0]  # error only at |k| = 3
    assert err[0] < 1e-25 and err[2] < 1e-25  # FFT round-off only
    assert err[1] == pytest.approx(0.25)  # (0.5 A)² / A²
    assert torch.allclose(M.spectral_error_B3(torch.zeros_like(truth), truth), torch.ones(1, 3, dtype=torch.float64))


@pytest.mark.parametrize("operator", spectral.OPERATORS)
def test_divergence_of_curl_is_roundoff(operator):
    a = _field(3, batch=1)
    div = spectral.divergence_stats(spectral.curl(a, operator), operator)
    assert div["rel_max"] < 1e-12
    # a gradient field is not divergence-free: the metric must see it
    phi = _field(4, batch=1)[:, 0]
    grad_u = spectral.gradient(phi.unsqueeze(1), operator)[:, 0]
    assert spectral.divergence_stats(grad_u, operator)["rel_max"] > 1e-2


def test_routing_fractions_and_bifurcation():
    counts_KLE = torch.tensor([[[10.0, 0, 0, 0], [3, 3, 3, 3]],
                               [[1, 1, 2, 0], [0, 0, 0, 0]]], dtype=torch.float64)
    p_KLE = expert_given_domain_KLE(counts_KLE)
    assert torch.allclose(p_KLE[0].sum(-1), torch.ones(2, dtype=torch.float64))
    assert torch.isnan(p_KLE[1, 1]).all()  # a domain with no tokens has no distribution
    bif_KL = bifurcation_KL(counts_KLE)
    assert bif_KL[0, 0] == 1.0 and bif_KL[0, 1] == 0.25 and bif_KL[1, 0] == 0.5
    assert torch.isnan(bif_KL[1, 1])


def test_spectral_error_of_an_empty_band_is_bounded():
    truth = _mode(1)  # nothing in the mid and high bands
    err = M.spectral_error_B3(truth + 1e-3 * _mode(6), truth)[0]
    assert err[0] < 1e-25 and err[1] < 1e-25
    assert err[2] == pytest.approx(1e-6 / M.SPECTRAL_FLOOR)  # (1e-3)² of the energy, over the floor


@pytest.mark.parametrize("n", [16, 15])
def test_divergence_stats_gradient_rms_by_parseval_equals_the_gradient_operator(n):
    u = torch.randn(2, 3, n, n, n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    direct = float(spectral.gradient(u, "spectral").pow(2).sum(dim=(-5, -4)).mean().sqrt())
    assert spectral.divergence_stats(u, "spectral")["grad_rms"] == pytest.approx(direct, rel=1e-12)


@pytest.mark.parametrize("operator", spectral.OPERATORS)
def test_solenoidal_part_is_divergence_free_keeps_the_mean_and_is_a_projection(operator):
    u = _field(6)[0]
    p = spectral.solenoidal(u, operator)
    assert spectral.divergence_stats(u[None], operator)["rel_max"] > 0.1
    assert spectral.divergence_stats(p[None], operator)["rel_max"] < 1e-13
    assert torch.allclose(p.mean(dim=(-3, -2, -1)), u.mean(dim=(-3, -2, -1)), atol=1e-14)
    assert torch.allclose(spectral.solenoidal(p, operator), p, atol=1e-12)
    # orthogonal: the removed part carries no energy of the kept one
    assert abs(float(((u - p) * (p - p.mean(dim=(-3, -2, -1), keepdim=True))).sum())) < 1e-9 * float((u * u).sum())
    # a curl (of the matching operator) is left alone
    a = _field(7)[0]
    w = spectral.curl(a, operator)
    assert torch.allclose(spectral.solenoidal(w, operator), w, atol=1e-12)
