"""Physics checks of the solver against analytic solutions and conservation properties."""

import numpy as np
import torch

from shodh.fields.spectral import SpectralGrid, resample
from shodh.physics import domains, validation
from shodh.physics.solver import NavierStokes


def test_taylor_green_matches_exact_decay_float64():
    result = validation.taylor_green()
    assert result["steps"] >= 40 and result["rel_error"] <= 1e-10, result


def test_nonlinear_term_is_active():
    # Guard against a solver that only diffuses: a random field must move energy across scales.
    grid = SpectralGrid(32, dtype=torch.float64)
    solver = NavierStokes(grid, 1e-3, lambda t: torch.zeros(3, dtype=torch.float64))
    solver.set_velocity(grid.random_solenoidal(kmax=3, rms=1.0, generator=torch.Generator().manual_seed(1)))
    solver.advance(0.5, cfl=0.5, max_dt=0.02)
    high = (grid.k2_XYH > 16) * grid.dealias_XYH
    energy = solver.uh_CXYH.abs() ** 2
    assert float((energy * high).sum()) > 1e-6 * float(energy.sum())


def test_projection_float32_divergence_is_roundoff():
    assert validation.projection_divergence()["rel_max"] <= 1e-5


def test_porous_darcy_linearity_and_solid_leak():
    result = validation.darcy()
    assert 0.58 <= result["porosity"] <= 0.82
    assert result["rel_diff"] <= 1e-3, result
    # Measured 0.20 at max_dt = 0.1, 0.12 at 0.02 (first-order splitting of the penalization; README).
    assert result["solid_leak"] < 0.25, result


def test_sphere_packing_is_non_overlapping_and_new_per_seed():
    grid = SpectralGrid(32)
    cfg = domains.PorousConfig()
    geo = domains.sphere_packing(cfg, grid, np.random.default_rng(0))
    c, r, length = geo["centers"], geo["radii"], grid.length
    d = np.linalg.norm((c[:, None] - c[None] + length / 2) % length - length / 2, axis=-1)
    gap = d - (r[:, None] + r[None])
    np.fill_diagonal(gap, np.inf)
    assert gap.min() >= cfg.gap_cells * grid.dx - 1e-6
    assert abs(geo["porosity"] - geo["target"]) < 0.02
    other = domains.sphere_packing(cfg, grid, np.random.default_rng(1))
    assert not torch.equal(other["chi"], geo["chi"])


def test_channel_profile_and_mean_momentum_balance():
    result = validation.channel_balance()
    assert result["residual"] <= 0.02, result  # the issue asks for 10%
    assert result["drag_impulse"] > 0.5 * result["forcing_impulse"]  # the wall carries the load
    profile = np.array(result["profile"])
    quarter = len(profile) // 4
    assert profile[0] < 0.5 * profile[-1]  # rises from the wall ...
    assert profile[:quarter].mean() < profile[-quarter:].mean()  # ... to the free surface
    assert result["fluct_rms_over_u_tau"] > 0.3  # turbulent, not a laminar profile
    assert result["solid_max_over_max"] < 0.2


def test_resample_is_exact_for_band_limited_fields():
    coarse, fine = SpectralGrid(16, dtype=torch.float64), SpectralGrid(32, dtype=torch.float64)
    u16 = coarse.random_solenoidal(kmax=5, rms=1.0, generator=torch.Generator().manual_seed(2))
    u32 = resample(u16, 32)
    assert torch.allclose(u32[:, ::2, ::2, ::2], u16, atol=1e-12)  # coincident points agree
    x, y, z = fine.x_CXYZ
    wave = torch.sin(2 * x + z) * torch.cos(3 * y)
    assert torch.allclose(resample(wave[None, ::2, ::2, ::2], 32)[0], wave, atol=1e-12)
    assert torch.allclose(resample(u32, 16), u16, atol=1e-12)
