"""Physics checks of the solver against analytic and conservation properties."""

import math

import numpy as np
import pytest
import torch

from shodh.physics import domains
from shodh.physics.solver import NavierStokes, SpectralGrid, relative_divergence


def no_force(t):
    return torch.zeros(3, dtype=torch.float64)


def test_taylor_green_matches_exact_decay_float64():
    # u = (sin x cos y, -cos x sin y, 0) e^{-2 nu t} solves NS exactly (its advection is a gradient).
    grid = SpectralGrid(32, dtype=torch.float64)
    x, y, _ = grid.x_CXYZ
    u0 = torch.stack([torch.sin(x) * torch.cos(y), -torch.cos(x) * torch.sin(y), torch.zeros_like(x)])
    nu, t_end = 0.05, 2.0
    solver = NavierStokes(grid, nu, no_force)
    solver.set_velocity(u0)
    steps = solver.advance(t_end, cfl=0.5, max_dt=0.05)
    exact = u0 * math.exp(-2 * nu * t_end)
    err = float((solver.velocity() - exact).abs().max() / exact.abs().max())
    assert steps >= 40 and err <= 1e-10, err


def test_nonlinear_term_is_active():
    # Guard against a solver that only diffuses: a random field must exchange energy across scales.
    grid = SpectralGrid(32, dtype=torch.float64)
    u0 = grid.random_solenoidal(kmax=3, rms=1.0, generator=torch.Generator().manual_seed(1))
    solver = NavierStokes(grid, 1e-3, no_force)
    solver.set_velocity(u0)
    solver.advance(0.5, cfl=0.5, max_dt=0.02)
    high = (grid.k2_XYK > 16) * grid.dealias_XYK
    energy_high = float((solver.uh_CXYK.abs() ** 2 * high).sum())
    assert energy_high > 1e-6 * float((solver.uh_CXYK.abs() ** 2).sum())


def test_projection_float32_divergence_is_roundoff():
    grid = SpectralGrid(32, dtype=torch.float32)
    solver = NavierStokes(grid, 0.01, no_force, chi_XYZ=(grid.x_CXYZ[2] < 1.0).float())
    solver.set_velocity(grid.random_solenoidal(4, 1.0, torch.Generator().manual_seed(0)))
    for _ in range(5):
        solver.step(0.01)
    div = relative_divergence(solver.velocity(), SpectralGrid(32))
    assert div["rel_max"] <= 1e-5, div


def _steady_darcy(grid, geo, nu, force):
    solver = NavierStokes(grid, nu, lambda t: torch.tensor([force, 0.0, 0.0], dtype=torch.float64),
                          chi_XYZ=geo["chi"], eta=1e-3)
    flux = 0.0
    for _ in range(60):
        solver.advance(2.0, cfl=0.5, max_dt=0.1)
        u = solver.velocity()
        new = float(u[0].mean())  # superficial (Darcy) velocity q: mean over fluid and solid
        if abs(new - flux) < 1e-9 * abs(new):
            break
        flux = new
    return new, u


def test_porous_darcy_linearity_and_solid_leak():
    grid = SpectralGrid(32, dtype=torch.float64)
    cfg = domains.PorousConfig()
    geo = domains.sphere_packing(cfg, grid, np.random.default_rng(3))
    assert cfg.porosity[0] - 0.02 <= geo["porosity"] <= cfg.porosity[1] + 0.02
    nu = 0.1
    perm = []
    for force in (1e-3, 2e-3):
        q, u = _steady_darcy(grid, geo, nu, force)
        perm.append(nu * q / force)
    assert abs(perm[0] - perm[1]) / perm[0] <= 1e-3, perm
    solid = geo["chi"] > 0.5
    speed2 = (u**2).sum(0)
    leak = float(speed2[solid].mean().sqrt() / speed2[~solid].mean().sqrt())
    # Measured 0.15 at max_dt = 0.1 (first-order splitting of the penalization; see README).
    assert leak < 0.25, leak


def test_sphere_packing_is_non_overlapping():
    grid = SpectralGrid(32)
    cfg = domains.PorousConfig()
    geo = domains.sphere_packing(cfg, grid, np.random.default_rng(0))
    c, r, length = geo["centers"], geo["radii"], grid.length
    d = np.linalg.norm((c[:, None] - c[None] + length / 2) % length - length / 2, axis=-1)
    gap = d - (r[:, None] + r[None])
    np.fill_diagonal(gap, np.inf)
    assert gap.min() >= cfg.gap_cells * grid.dx - 1e-6
    other = domains.sphere_packing(cfg, grid, np.random.default_rng(1))
    assert not torch.equal(other["chi"], geo["chi"])  # a new geometry per trajectory seed


def test_channel_profile_and_mean_momentum_balance():
    grid = SpectralGrid(32, dtype=torch.float32)
    cfg = domains.ChannelConfig()
    solver, geo = domains.channel_solver(cfg, grid, eta=1e-3)
    solver.set_velocity(domains.channel_initial(cfg, grid, geo, seed=0))
    solver.advance(15.0, cfl=0.5, max_dt=0.1)
    u_start = float(solver.velocity()[0].mean())
    impulse_start, t_start = solver.drag_impulse_C.clone(), solver.t
    solver.advance(10.0, cfl=0.5, max_dt=0.1)
    u = solver.velocity()
    span = solver.t - t_start
    forcing = geo["G"] * span  # mean pressure gradient impulse per unit volume
    drag = float((solver.drag_impulse_C - impulse_start)[0])
    change = float(u[0].mean()) - u_start
    residual = abs(change - (forcing - drag)) / forcing
    assert residual <= 0.02, residual  # the issue asks for 10%
    assert drag > 0.5 * forcing  # the wall really carries the load
    s, profile = domains.plane_profile(u, geo, grid)
    quarter = len(profile) // 4
    assert profile[0] < 0.5 * profile[-1]
    assert profile[:quarter].mean() < profile[-quarter:].mean()
    fluct = u - u.mean(dim=(1, 2), keepdim=True)
    assert float(fluct.pow(2).mean().sqrt()) > 0.3 * cfg.u_tau  # turbulent, not a laminar profile
    assert float(u[:, geo["chi"] > 0.5].abs().max()) < 0.2 * float(u[0].abs().max())
