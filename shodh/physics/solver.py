"""Pseudo-spectral incompressible Navier–Stokes in a periodic box, with Brinkman penalization.

Shape legend (the project's, see shodh/fields): C = 3 velocity components (x, y, z); X, Y, Z =
grid axes (N each); H = the halved rfft axis along z (N // 2 + 1). Physical fields are
`*_CXYZ` / `*_XYZ`, spectral coefficients `*h_CXYH` (unnormalized `torch.fft.rfftn`). The grid,
its wavenumbers and operators are `shodh.fields.spectral.SpectralGrid`.

Scheme (box [0, L)^3, default L = 2π):
  du/dt = P[u × ω + f]_dealiased + ν ∇²u        (rotational form, Leray projector P)
advanced with an integrating factor exp(-ν k² t) for the viscous term and SSP-RK3 (Shu–Osher)
for the rest, 2/3-rule dealiasing applied to the nonlinear term and to the state. Solids enter by
Brinkman penalization, du/dt = -χ u / η, applied as an exact implicit decay after each RK step
(Lie splitting; unconditionally stable for any η) followed by a projection, so the stored velocity
is divergence-free to round-off in the spectral sense. An optional mirror symmetry in z
(u_x, u_y even, u_z odd about z = 0 and z = L/2) turns z = L/2 into a free-slip plane.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from shodh.fields.spectral import SpectralGrid

Forcing = Callable[[float], torch.Tensor]  # t -> body force [3] (uniform in space)


def mirror_z(u_CXYZ: torch.Tensor) -> torch.Tensor:
    """Reflection z -> -z (mod L), with u_z negated: the mirror that makes z = L/2 free-slip."""
    flipped = torch.roll(torch.flip(u_CXYZ, dims=[-1]), shifts=1, dims=-1)
    return flipped * torch.tensor([1.0, 1.0, -1.0], dtype=u_CXYZ.dtype, device=u_CXYZ.device).view(3, 1, 1, 1)


@dataclass
class StepStats:
    dt: float
    drag_C: torch.Tensor  # mean momentum removed by the solid per unit time during the step


class NavierStokes:
    """Time stepper; `uh_CXYH` is the state, `t` the time.

    `chi_XYZ` is the solid indicator (1 in solid cells, 0 in fluid), `eta` the penalization
    time scale: velocity in the solid relaxes to zero as exp(-t/eta). The split is first order
    in time: the projection after the decay leaks some velocity back into the solid, more for
    larger dt (measured in tests/test_physics.py and stated in the README).
    """

    def __init__(
        self,
        grid: SpectralGrid,
        nu: float,
        forcing: Forcing,
        chi_XYZ: torch.Tensor | None = None,
        eta: float = 1e-3,
        mirror: bool = False,
    ):
        self.grid, self.nu, self.forcing, self.eta, self.mirror = grid, nu, forcing, eta, mirror
        self.chi_XYZ = None if chi_XYZ is None else chi_XYZ.to(grid.device, grid.dtype)
        self.uh_CXYH = torch.zeros(grid.k_CXYH.shape, dtype=grid.complex_dtype, device=grid.device)
        self.t = 0.0
        self.drag_impulse_C = torch.zeros(3, dtype=torch.float64)  # ∫ drag dt, for momentum balance

    def set_velocity(self, u_CXYZ: torch.Tensor) -> None:
        self.uh_CXYH = self._constrain(u_CXYZ.to(self.grid.device, self.grid.dtype))

    def velocity(self) -> torch.Tensor:
        return self.grid.ifft(self.uh_CXYH)

    def _constrain(self, u_CXYZ: torch.Tensor) -> torch.Tensor:
        """Symmetrize (if mirrored), transform, project and truncate a physical field."""
        if self.mirror:
            u_CXYZ = 0.5 * (u_CXYZ + mirror_z(u_CXYZ))
        return self.grid.project(self.grid.fft(u_CXYZ)) * self.grid.dealias_XYH

    def _rhs(self, uh_CXYH: torch.Tensor, t: float) -> torch.Tensor:
        g = self.grid
        u = g.ifft(uh_CXYH)
        omega = g.ifft(g.curl_hat(uh_CXYH))
        nonlinear = torch.linalg.cross(u, omega, dim=0)
        force = self.forcing(t).to(g.device, g.dtype).view(3, 1, 1, 1)
        return g.project(g.fft(nonlinear + force)) * g.dealias_XYH

    def stable_dt(self, cfl: float, max_dt: float) -> float:
        u = self.velocity()
        speed = float(u.abs().sum(0).max())
        return min(max_dt, cfl * self.grid.dx / speed) if speed > 0 else max_dt

    def step(self, dt: float) -> StepStats:
        g, t = self.grid, self.t
        e_full = torch.exp(-self.nu * g.k2_XYH * dt)
        e_half = torch.exp(-self.nu * g.k2_XYH * dt / 2)
        # SSP-RK3 on v = exp(ν k² τ) û, written back in û; stages sit at t + dt, t + dt/2, t + dt.
        u0 = self.uh_CXYH
        n0 = self._rhs(u0, t)
        u1 = e_full * (u0 + dt * n0)
        u2 = 0.75 * e_half * u0 + 0.25 * (e_half * (u0 + dt * n0) + dt * self._rhs(u1, t + dt) / e_half)
        u3 = (1 / 3) * e_full * u0 + (2 / 3) * e_half * (u2 + dt * self._rhs(u2, t + dt / 2))
        self.t = t + dt
        drag = torch.zeros(3, dtype=torch.float64)
        if self.chi_XYZ is None and not self.mirror:
            self.uh_CXYH = u3
        else:
            u = g.ifft(u3)
            if self.chi_XYZ is not None:
                removed = u * (1 - torch.exp(-self.chi_XYZ * (dt / self.eta)))
                u = u - removed
                drag = removed.mean(dim=(-3, -2, -1)).to(torch.float64).cpu() / dt
            self.uh_CXYH = self._constrain(u)
        self.drag_impulse_C += drag * dt
        return StepStats(dt=dt, drag_C=drag)

    def advance(self, duration: float, cfl: float, max_dt: float, on_step=None) -> int:
        """Advance by `duration` with CFL-limited steps; the last step lands exactly on time."""
        t_end, steps = self.t + duration, 0
        while self.t < t_end - 1e-12 * max(1.0, abs(t_end)):
            dt = min(self.stable_dt(cfl, max_dt), t_end - self.t)
            stats = self.step(dt)
            steps += 1
            if not torch.isfinite(self.uh_CXYH).all():
                raise FloatingPointError(f"solver diverged at t={self.t:.4g} (dt={dt:.3g}); lower cfl/max_dt")
            if on_step is not None:
                on_step(stats)
        return steps
