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


# Steady state: the superficial velocity changes by less than this between two checks.
STEADY_RTOL = {torch.float64: 1e-7, torch.float32: 1e-5}


def _steady_flux(solver: NavierStokes, advance, max_checks: int) -> tuple[float, int]:
    """Call `advance()` until the superficial velocity (mean u_x over the box) has settled to
    STEADY_RTOL; returns it and the number of calls (max_checks if it never settled)."""
    flux = 0.0
    for checks in range(1, max_checks + 1):
        advance()
        new = float(solver.velocity()[0].double().mean())
        if abs(new - flux) < STEADY_RTOL[solver.grid.dtype] * abs(new):
            return new, checks
        flux = new
    return new, max_checks


def darcy(n: int = 32, nu: float = 0.1, forces=(1e-3, 2e-3), max_dt: float = 0.1, seed: int = 3,
          dtype: torch.dtype = torch.float64) -> dict:
    """Permeability K = nu q / f at two forcings (steady state) and the solid leak.

    q is the superficial velocity (mean of u_x over the whole box). Leak = rms |u| in the solid
    over rms |u| in the fluid, at the smaller forcing. The packing is the porous domain's
    default (`PorousConfig`), drawn with `seed`.
    """
    grid = SpectralGrid(n, dtype=dtype)
    geo = domains.sphere_packing(domains.PorousConfig(), grid, np.random.default_rng(seed))
    perm, leaks, times = [], [], []
    for force in forces:
        vec = torch.tensor([force, 0.0, 0.0], dtype=torch.float64)
        solver = NavierStokes(grid, nu, lambda t, vec=vec: vec, chi_XYZ=geo["chi"], eta=1e-3)
        new, _ = _steady_flux(solver, lambda solver=solver: solver.advance(2.0, cfl=0.5, max_dt=max_dt), 100)
        u = solver.velocity()
        perm.append(nu * new / force)
        times.append(solver.t)
        solid = geo["chi"] > 0.5
        speed2 = (u.double() ** 2).sum(0)
        leaks.append(float(speed2[solid].mean().sqrt() / speed2[~solid].mean().sqrt()))
    rel_diff = abs(perm[0] - perm[-1]) / abs(perm[0])
    return {"permeability": perm, "rel_diff": rel_diff, "solid_leak": leaks[0],
            "porosity": geo["porosity"], "steady_time": times, "max_dt": max_dt, "grid": n}


def porous_dt_convergence(n: int = 64, dts=(0.1, 0.0125), dtype: torch.dtype = torch.float32) -> dict:
    """Permeability of the default packing at two time steps (the issue's 0.1 vs 0.0125), and the leak."""
    runs = [darcy(n=n, forces=(1e-3,), max_dt=dt, dtype=dtype) for dt in dts]
    k = [r["permeability"][0] for r in runs]
    return {"grid": n, "dtype": str(dtype).removeprefix("torch."), "max_dt": list(dts), "permeability": k,
            "rel_change": abs(k[0] - k[1]) / abs(k[1]), "solid_leak": [r["solid_leak"] for r in runs],
            "porosity": runs[0]["porosity"]}


# Zick & Homsy (1982), J. Fluid Mech. 115, 13-26, Table 2: simple cubic arrays, K = F / (6 pi mu a U).
ZICK_HOMSY_SC = {0.027: 2.008, 0.064: 2.810, 0.125: 4.292, 0.216: 7.442, 0.343: 15.4, 0.45: 28.1, 0.5236: 42.1}


def sphere_array_drag(n: int, solid_fraction: float, nu: float = 0.1, eta: float = 1e-3, dt: float = 5.0,
                      dtype: torch.dtype = torch.float64) -> dict:
    """Stokes drag of a simple cubic array of spheres (one sphere per periodic box) against
    Zick & Homsy's table.

    Normalization (theirs): K = F / (6 pi mu a U), F the force on one sphere, U the superficial
    velocity (mean of u_x over the whole cell, solid included), a the radius giving the solid
    fraction c = 4/3 pi a^3 / L^3. A uniform body force f drives the flow; at steady state the
    penalization removes f L^3 per cell (the sphere's share of the mean pressure gradient
    included), so F = f L^3 with rho = 1, mu = nu. f is small enough for Stokes flow (Re ~ 1e-4).
    The steady state does not depend on dt (the scheme's fixed points are exact), so a large dt
    reaches it in tens of steps. The sphere is centred between grid points; the mask is sharp.
    """
    grid = SpectralGrid(n, dtype=dtype)
    length = grid.length
    radius = length * (3 * solid_fraction / (4 * math.pi)) ** (1 / 3)
    r = ((grid.x_CXYZ - length / 2 + grid.dx / 2) ** 2).sum(0).sqrt()
    chi = (r < radius).to(dtype)
    force = 1e-4
    vec = torch.tensor([force, 0.0, 0.0], dtype=torch.float64)
    solver = NavierStokes(grid, nu, lambda t: vec, chi_XYZ=chi, eta=eta)
    new, steps = _steady_flux(solver, lambda: solver.step(dt), 1000)
    k = force * length**3 / (6 * math.pi * nu * radius * new)
    ref = ZICK_HOMSY_SC.get(solid_fraction)
    return {"grid": n, "solid_fraction": solid_fraction, "mask_fraction": float(chi.mean()), "K": k,
            "zick_homsy": ref, "rel_error": None if ref is None else k / ref - 1, "steps": steps,
            "cg_iterations_per_step": solver.cg_iterations / steps}


def bulk_and_profile(u_CXYZ: torch.Tensor, geo: dict, grid: SpectralGrid) -> tuple[float, np.ndarray]:
    """Bulk velocity over the fluid height (each point stands for its cell; the surface point for
    half of one) and the plane-averaged profile from the first fluid point to the surface."""
    _, profile = domains.plane_profile(u_CXYZ, geo, grid)
    bulk = (profile[:-1].sum() + profile[-1] / 2) * grid.dx / geo["height"]
    return float(bulk), profile


def channel_statistics(solver: NavierStokes, cfg: domains.ChannelConfig, geo: dict, duration: float, cfl: float,
                       max_dt: float, on_step=None, sample_every: float = 1.0) -> dict:
    """Run the channel for `duration`, sampling every `sample_every`: the bulk velocity U_b+,
    the wall stress tau_w / u_tau^2 (from the momentum the wall slab removes, less the forcing
    that acts on the slab itself) and the mean profile.

    Stationarity is judged over the last H / u_tau (or the whole run if shorter): `ub_drift` is
    the relative change of U_b across that window, `wall_stress_plus` the window's mean wall
    stress (1 when the wall carries exactly the driving force), and `profile` the window's
    time-averaged u+ at the points' y+ (wall midway between the last solid and first fluid point).
    """
    grid, u_tau = solver.grid, cfg.u_tau
    window = min(duration, geo["height"] / u_tau)
    times, ub, stress, profiles, steps = [], [], [], [], 0
    t_end = solver.t + duration
    while solver.t < t_end - 1e-9:
        impulse, t_start = float(solver.drag_impulse_C[0]), solver.t
        steps += solver.advance(min(sample_every, t_end - solver.t), cfl, max_dt, on_step)
        drag = (float(solver.drag_impulse_C[0]) - impulse) / (solver.t - t_start)  # per unit volume
        # drag * L^3 = wall force on both faces + G * slab volume (2 z_w L^2); per face, over u_tau^2:
        stress.append((drag * grid.length / 2 - geo["G"] * geo["half_wall"]) / u_tau**2)
        bulk, profile = bulk_and_profile(solver.velocity(), geo, grid)
        times.append(solver.t)
        ub.append(bulk / u_tau)
        profiles.append(profile / u_tau)
    last = [i for i, t in enumerate(times) if t >= t_end - window - 1e-9]
    y, _ = domains.plane_profile(solver.velocity(), geo, grid)
    return {
        "grid": grid.n, "time": duration, "steps": steps, "window": window, "re_tau": cfg.re_tau,
        "ub_plus": float(np.mean([ub[i] for i in last])),
        "ub_drift": (ub[last[-1]] - ub[last[0]]) / ub[last[-1]] if len(last) > 1 else 0.0,
        "ub_plus_std": float(np.std([ub[i] for i in last])),
        "wall_stress_plus": float(np.mean([stress[i] for i in last])),
        "series": {"t": [round(t, 3) for t in times], "ub_plus": [round(v, 4) for v in ub],
                   "wall_stress_plus": [round(v, 4) for v in stress]},
        "profile": {"y_plus": (y * u_tau / geo["nu"]).tolist(),
                    "u_plus": np.mean([profiles[i] for i in last], axis=0).tolist()},
    }


def law_of_the_wall(y_plus: np.ndarray, kappa: float = 0.41, b: float = 5.2) -> np.ndarray:
    """u+ = y+ in the viscous sublayer (y+ < 5), the log law (1/kappa) ln y+ + B above y+ = 30, NaN between."""
    y_plus = np.asarray(y_plus, dtype=np.float64)
    out = np.full_like(y_plus, np.nan)
    out[y_plus < 5] = y_plus[y_plus < 5]
    log = y_plus >= 30
    out[log] = np.log(y_plus[log]) / kappa + b
    return out


def channel_against_references(stats: dict) -> dict:
    """U_b+ against the correlation, u+ against the log law over 30 <= y+ <= 0.6 Re_tau."""
    y, u = np.array(stats["profile"]["y_plus"]), np.array(stats["profile"]["u_plus"])
    band = (y >= 30) & (y <= 0.6 * stats["re_tau"])
    law = law_of_the_wall(y)
    ref = domains.bulk_velocity_plus(stats["re_tau"])
    return {
        "ub_plus": stats["ub_plus"], "ub_plus_correlation": ref, "ub_rel_error": stats["ub_plus"] / ref - 1,
        "log_band_y_plus": y[band].round(2).tolist(), "log_band_rel_error": (u[band] / law[band] - 1).round(4).tolist(),
        "log_band_max_abs_rel_error": float(np.abs(u[band] / law[band] - 1).max()) if band.any() else None,
    }
