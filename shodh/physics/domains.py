"""The two physics regimes: open-channel turbulence and flow through a random sphere packing.

Both live in the periodic box of `solver.py` (side L = 2π, N^3 points); solids are Brinkman
penalized. Shape legend: the project's (shodh/fields; here C, X, Y, Z).

channel: a wall slab centred on z = 0 (no-slip by penalization) and mirror symmetry about
  z = L/2 (free-slip surface), driven by a constant mean pressure gradient G e_x. The box holds
  the open channel (wall at z = h, surface at z = L/2) and its mirror image, which keeps the
  stored field periodic. Scales: friction velocity u_tau, height H = L/2 - h, nu = u_tau H / Re_tau,
  G = u_tau² / H (so wall stress balances G in the mean).
porous: non-overlapping spheres (radii drawn from a range, random centres pushed apart) at a
  porosity drawn from a range; a body force whose
  magnitude and direction vary slowly in time drives a low-Reynolds-number flow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from shodh.errors import ShodhError, check
from shodh.fields.spectral import SpectralGrid
from shodh.physics.solver import NavierStokes


@dataclass
class ChannelConfig:
    re_tau: float = 120.0  # friction Reynolds number u_tau H / nu
    u_tau: float = 0.07  # friction velocity (box units); sets the time scale
    wall_fraction: float = 0.125  # fraction of the box height taken by the wall slab
    spinup_time: float = 60.0  # one spin-up from the law of the wall, shared by trajectories ...
    spinup_grid: int = 32  # ... on a coarser grid (cheap), then interpolated spectrally ...
    settle_time: float = 40.0  # ... and run on the storage grid (about H / u_tau at the defaults)
    decorrelation_time: float = 8.0  # run after each trajectory's seeded perturbation
    perturbation: float = 0.05  # rms of the seeded perturbation, relative to the bulk velocity
    frame_interval: float = 1.0  # time between stored frames
    max_dt: float = 0.1

    def validate(self) -> None:
        check(self.re_tau > 0, "re_tau", f"must be > 0, got {self.re_tau}")
        check(self.u_tau > 0, "u_tau", f"must be > 0, got {self.u_tau}")
        check(0 < self.wall_fraction < 0.5, "wall_fraction", f"must be in (0, 0.5), got {self.wall_fraction}")
        check(self.settle_time > 0, "settle_time",
              f"must be > 0 (the frames' grid needs a run of its own), got {self.settle_time}")
        for name in ("spinup_time", "decorrelation_time", "perturbation"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.spinup_grid >= 16, "spinup_grid", f"must be >= 16, got {self.spinup_grid}")
        check(self.frame_interval > 0, "frame_interval", f"must be > 0, got {self.frame_interval}")
        check(self.max_dt > 0, "max_dt", f"must be > 0, got {self.max_dt}")


@dataclass
class PorousConfig:
    porosity: list[float] = field(default_factory=lambda: [0.6, 0.8])  # target range, drawn per trajectory
    radius: list[float] = field(default_factory=lambda: [0.09, 0.14])  # sphere radii, fraction of L
    gap_cells: float = 1.0  # minimum fluid gap between spheres, in grid cells
    nu: float = 0.1
    force: float = 0.05  # mean body-force magnitude
    modulation: float = 0.5  # relative amplitude of the force-magnitude oscillation
    turn_deg: float = 30.0  # amplitude of the force-direction oscillation in the x-y plane
    period: float = 24.0  # period of the oscillations
    spinup_time: float = 10.0
    frame_interval: float = 1.0
    max_dt: float = 0.1

    def validate(self) -> None:
        lo, hi = (self.porosity + [None, None])[:2]
        check(len(self.porosity) == 2 and 0.3 <= lo <= hi < 1, "porosity",
               f"must be [low, high] with 0.3 <= low <= high < 1, got {self.porosity}")
        rlo, rhi = (self.radius + [None, None])[:2]
        check(len(self.radius) == 2 and 0 < rlo <= rhi < 0.25, "radius",
               f"must be [low, high] with 0 < low <= high < 0.25, got {self.radius}")
        for name in ("nu", "force", "period", "frame_interval", "max_dt"):
            check(getattr(self, name) > 0, name, f"must be > 0, got {getattr(self, name)}")
        for name in ("gap_cells", "modulation", "spinup_time"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.modulation < 1, "modulation", f"must be < 1 (force never reverses), got {self.modulation}")


def periodic_offset(x: torch.Tensor, center: float, length: float) -> torch.Tensor:
    return torch.remainder(x - center + length / 2, length) - length / 2


# ---------------------------------------------------------------- channel


def channel_geometry(cfg: ChannelConfig, grid: SpectralGrid) -> dict:
    """The wall slab as a sharp, mirror-symmetric mask on whole grid points, and the flow scales.

    The slab holds the points j with |j| < w, w = round(wall_fraction * N / 2) (decided on grid
    indices, so the mask is exactly symmetric about z = 0 whatever the float rounding); the
    wall surface is taken midway between the last solid and the first fluid point, at
    z_w = (w - 1/2) dx, and the channel height is H = L/2 - z_w. A sharp mask: with dt/eta >> 1
    the implicit penalization turns any smooth ramp into solid.
    """
    n = grid.n
    w = max(1, round(cfg.wall_fraction * n / 2))
    j = torch.arange(n, device=grid.device)
    solid_Z = torch.minimum(j, n - j) < w
    chi = solid_Z.to(grid.dtype).view(1, 1, n).expand(n, n, n).contiguous()
    wall = (w - 0.5) * grid.dx
    height = grid.length / 2 - wall
    nu = cfg.u_tau * height / cfg.re_tau
    return {"chi": chi, "height": height, "half_wall": wall, "nu": nu, "G": cfg.u_tau**2 / height}


def channel_solver(cfg: ChannelConfig, grid: SpectralGrid, eta: float) -> tuple[NavierStokes, dict]:
    geo = channel_geometry(cfg, grid)
    force = torch.tensor([geo["G"], 0.0, 0.0], dtype=torch.float64)
    solver = NavierStokes(grid, geo["nu"], lambda t: force, chi_XYZ=geo["chi"], eta=eta, mirror=True)
    return solver, geo


def bulk_velocity_plus(re_tau: float) -> float:
    """U_b / u_tau of a turbulent channel from the correlation Re_tau = 0.09 Re_b^0.88 (Pope,
    Turbulent Flows, eq. 7.48; Re_b = U_b 2H / nu with H the half-height, here the open
    channel's height)."""
    return (re_tau / 0.09) ** (1 / 0.88) / (2 * re_tau)


def reichardt(y_plus: torch.Tensor) -> torch.Tensor:
    """Reichardt's law of the wall, u+ (y+), smooth from the viscous sublayer to the log law."""
    return torch.log1p(0.4 * y_plus) / 0.4 + 7.8 * (1 - torch.exp(-y_plus / 11) - y_plus / 11 * torch.exp(-y_plus / 3))


def bulk_velocity(cfg: ChannelConfig) -> float:
    return cfg.u_tau * bulk_velocity_plus(cfg.re_tau)


def channel_initial(cfg: ChannelConfig, grid: SpectralGrid, geo: dict, seed: int) -> torch.Tensor:
    """Reichardt's mean profile plus strong large-scale noise, to trigger turbulence.

    Starting at the law of the wall (rather than a power law at a guessed bulk velocity)
    leaves the spin-up to grow the turbulence instead of accelerating the bulk, which takes
    several H / u_tau.
    """
    s = (periodic_offset(grid.x_CXYZ[2], 0.0, grid.length).abs() - geo["half_wall"]).clamp(min=0, max=geo["height"])
    mean = cfg.u_tau * reichardt(s * cfg.u_tau / geo["nu"])
    gen = torch.Generator().manual_seed(seed)
    noise = grid.random_solenoidal(kmax=4, rms=0.3 * bulk_velocity(cfg), generator=gen)
    u = noise * (1 - geo["chi"])
    u[0] += mean * (1 - geo["chi"])
    return u


def plane_profile(u_CXYZ: torch.Tensor, geo: dict, grid: SpectralGrid) -> tuple[np.ndarray, np.ndarray]:
    """Plane-averaged streamwise velocity vs distance from the wall (fluid half of the box)."""
    ux_Z = u_CXYZ[0].mean(dim=(0, 1)).double().cpu().numpy()
    z = np.arange(grid.n) * grid.dx
    half = (z >= geo["half_wall"]) & (z <= grid.length / 2 + 1e-9)
    return z[half] - geo["half_wall"], ux_Z[half]


# ---------------------------------------------------------------- porous


def _relax(centers: np.ndarray, radii: np.ndarray, gap: float, length: float, rng) -> np.ndarray:
    """Push overlapping spheres apart (periodic) until every pair is separated by `gap`."""
    required = radii[:, None] + radii[None, :] + gap
    np.fill_diagonal(required, 0.0)
    for _ in range(5000):
        d = (centers[:, None, :] - centers[None, :, :] + length / 2) % length - length / 2
        dist = np.linalg.norm(d, axis=-1)
        np.fill_diagonal(dist, np.inf)
        overlap = np.clip(required - dist, 0, None)
        if overlap.max() < 1e-9 * length:
            return centers % length
        unit = d / np.maximum(dist, 1e-12)[..., None]
        # Each sphere of an overlapping pair moves half the overlap (slightly more, to converge).
        centers = centers + 0.55 * (overlap[..., None] * unit).sum(axis=1)
        centers += rng.normal(scale=1e-4 * length, size=centers.shape) * (overlap.max(axis=1) > 0)[:, None]
    raise ShodhError("sim.porous: spheres did not separate; lower sim.porous.porosity range or gap_cells")


def sphere_packing(cfg: PorousConfig, grid: SpectralGrid, rng: np.random.Generator) -> dict:
    """A random packing of non-overlapping spheres at a porosity drawn from `cfg.porosity`.

    Radii are drawn from `cfg.radius` until their volume matches the target solid fraction,
    centres are placed at random and pushed apart until every pair is `gap_cells` apart (random
    sequential addition alone jams below the dense end of the range). The radii are rescaled
    twice so that the measured porosity of the grid (fraction of fluid cells) meets the target.
    Returns `chi` (1 in solid cells, 0 in fluid), centres, radii, measured porosity, target.
    """
    target = float(rng.uniform(*cfg.porosity))
    length, gap = grid.length, cfg.gap_cells * grid.dx
    radii: list[float] = []
    while sum(4 / 3 * math.pi * r**3 for r in radii) < (1 - target) * length**3:
        radii.append(rng.uniform(*cfg.radius) * length)
    radii_M = np.array(radii)
    centers_M3 = rng.uniform(0, length, size=(len(radii), 3))
    scale, porosity = 1.0, target  # porosity: measured by each attempt, read by the next
    for attempt in range(3):
        if attempt:
            scale *= ((1 - target) / max(1 - porosity, 1e-6)) ** (1 / 3)
        centers_M3 = _relax(centers_M3, radii_M * scale, gap, length, rng)
        solid = torch.zeros(grid.x_CXYZ.shape[1:], dtype=torch.bool, device=grid.device)
        for c, r in zip(centers_M3, radii_M * scale):
            offsets = [periodic_offset(grid.x_CXYZ[i], float(c[i]), length) for i in range(3)]
            solid |= sum(o**2 for o in offsets) < r**2
        porosity = 1 - float(solid.to(torch.float64).mean())
    chi = solid.to(grid.dtype)
    return {"chi": chi, "centers": centers_M3, "radii": radii_M * scale, "porosity": porosity, "target": target}


def porous_forcing(cfg: PorousConfig, phase: float):
    """Body force at time t: magnitude and in-plane direction oscillate (never reverse)."""
    turn = math.radians(cfg.turn_deg)

    def force(t: float) -> torch.Tensor:
        w = 2 * math.pi * t / cfg.period + phase
        magnitude = cfg.force * (1 + cfg.modulation * math.sin(w))
        angle = turn * math.sin(0.5 * w + phase)
        return torch.tensor([magnitude * math.cos(angle), magnitude * math.sin(angle), 0.0], dtype=torch.float64)

    return force
