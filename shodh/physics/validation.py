"""Physical checks of the solver, as functions returning the measured numbers.

The tests assert bounds on these numbers; `benchmarks/physics_report.py` prints them, which is
where the figures in the README come from.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from shodh.fields.spectral import SpectralGrid, divergence_stats
from shodh.physics import domains
from shodh.physics.solver import NavierStokes


def _no_force(t: float) -> torch.Tensor:
    return torch.zeros(3, dtype=torch.float64)


def taylor_green(n: int = 32, nu: float = 0.05, t_end: float = 2.0) -> dict:
    """Max relative error against u = (sin x cos y, -cos x sin y, 0) e^{-2 nu t}, float64.

    This field solves Navier-Stokes exactly (its advection is a pure gradient), so any error
    beyond round-off means a wrong viscous factor, time stepping or projection.
    """
    grid = SpectralGrid(n, dtype=torch.float64)
    x, y, _ = grid.x_CXYZ
    u0 = torch.stack([torch.sin(x) * torch.cos(y), -torch.cos(x) * torch.sin(y), torch.zeros_like(x)])
    solver = NavierStokes(grid, nu, _no_force)
    solver.set_velocity(u0)
    steps = solver.advance(t_end, cfl=0.5, max_dt=0.05)
    exact = u0 * math.exp(-2 * nu * t_end)
    return {"rel_error": float((solver.velocity() - exact).abs().max() / exact.abs().max()), "steps": steps}


def projection_divergence(n: int = 32, steps: int = 5) -> dict:
    """Relative spectral divergence (measured in float64) of a penalized float32 state after a few steps."""
    grid = SpectralGrid(n, dtype=torch.float32)
    solver = NavierStokes(grid, 0.01, _no_force, chi_XYZ=(grid.x_CXYZ[2] < 1.0).float())
    solver.set_velocity(grid.random_solenoidal(4, 1.0, torch.Generator().manual_seed(0)))
    for _ in range(steps):
        solver.step(0.01)
    return divergence_stats(solver.velocity().double()[None], "spectral", grid.length)


def darcy(n: int = 32, nu: float = 0.1, forces=(1e-3, 2e-3), max_dt: float = 0.1, seed: int = 3) -> dict:
    """Permeability K = nu q / f at two forcings (steady state, float64) and the solid leak.

    q is the superficial velocity (mean of u_x over the whole box). Leak = rms |u| in the solid
    over rms |u| in the fluid, at the smaller forcing.
    """
    grid = SpectralGrid(n, dtype=torch.float64)
    geo = domains.sphere_packing(domains.PorousConfig(), grid, np.random.default_rng(seed))
    perm, leaks, times = [], [], []
    for force in forces:
        vec = torch.tensor([force, 0.0, 0.0], dtype=torch.float64)
        solver = NavierStokes(grid, nu, lambda t, vec=vec: vec, chi_XYZ=geo["chi"], eta=1e-3)
        flux = 0.0
        for _ in range(100):
            solver.advance(2.0, cfl=0.5, max_dt=max_dt)
            u = solver.velocity()
            new = float(u[0].mean())
            if abs(new - flux) < 1e-9 * abs(new):
                break
            flux = new
        perm.append(nu * new / force)
        times.append(solver.t)
        solid = geo["chi"] > 0.5
        speed2 = (u**2).sum(0)
        leaks.append(float(speed2[solid].mean().sqrt() / speed2[~solid].mean().sqrt()))
    return {"permeability": perm, "rel_diff": abs(perm[0] - perm[1]) / abs(perm[0]), "solid_leak": leaks[0],
            "porosity": geo["porosity"], "steady_time": times, "max_dt": max_dt}


def channel_balance(n: int = 32, settle: float = 15.0, window: float = 10.0) -> dict:
    """Mean streamwise momentum over a window: forcing impulse vs wall drag vs change of <U>.

    Also returns the plane-averaged profile from the wall to the free-slip surface and the
    rms velocity fluctuation (u_tau units), so callers can check the flow is turbulent.
    """
    grid = SpectralGrid(n, dtype=torch.float32)
    cfg = domains.ChannelConfig()
    solver, geo = domains.channel_solver(cfg, grid, eta=1e-3)
    solver.set_velocity(domains.channel_initial(cfg, grid, geo, seed=0))
    solver.advance(settle, cfl=0.5, max_dt=cfg.max_dt)
    u_start, impulse_start, t_start = float(solver.velocity()[0].mean()), solver.drag_impulse_C.clone(), solver.t
    solver.advance(window, cfl=0.5, max_dt=cfg.max_dt)
    u = solver.velocity()
    forcing = geo["G"] * (solver.t - t_start)
    drag = float((solver.drag_impulse_C - impulse_start)[0])
    change = float(u[0].mean()) - u_start
    fluct = u - u.mean(dim=(1, 2), keepdim=True)
    _, profile = domains.plane_profile(u, geo, grid)
    return {
        "residual": abs(change - (forcing - drag)) / forcing, "forcing_impulse": forcing, "drag_impulse": drag,
        "mean_change": change, "profile": profile.tolist(), "fluct_rms_over_u_tau": float(fluct.pow(2).mean().sqrt()) / cfg.u_tau,
        "solid_max_over_max": float(u[:, geo["chi"] > 0.5].abs().max() / u[0].abs().max()),
    }
