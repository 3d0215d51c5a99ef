"""Pseudo-spectral incompressible Navier–Stokes in a periodic box, with Brinkman penalization.

Shape legend: C = 3 velocity components (x, y, z); X, Y, Z = grid axes (N each);
K = the halved rfft axis along z (N // 2 + 1). Physical fields are `*_CXYZ` / `*_XYZ`,
spectral coefficients `*h_CXYK` (unnormalized `torch.fft.rfftn`).

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

import math
from dataclasses import dataclass
from typing import Callable

import torch

Forcing = Callable[[float], torch.Tensor]  # t -> body force [3] (uniform in space)


class SpectralGrid:
    """Wavenumbers, FFTs and spectral differential operators on an N^3 periodic grid."""

    def __init__(self, n: int, length: float = 2 * math.pi, dtype=torch.float64, device="cpu"):
        self.n, self.length, self.dtype, self.device = n, length, dtype, torch.device(device)
        self.dx = length / n
        scale = 2 * math.pi / length
        k_full = torch.fft.fftfreq(n, 1.0 / n, dtype=dtype, device=device) * scale
        k_half = torch.fft.rfftfreq(n, 1.0 / n, dtype=dtype, device=device) * scale
        kx, ky, kz = torch.meshgrid(k_full, k_full, k_half, indexing="ij")
        self.k_CXYK = torch.stack([kx, ky, kz])
        self.k2_XYK = (self.k_CXYK**2).sum(0)
        # The k = 0 mode is never divided: its projection is the identity (mean flow kept).
        self.k2_safe_XYK = torch.where(self.k2_XYK == 0, torch.ones_like(self.k2_XYK), self.k2_XYK)
        cutoff = n / 3 * scale  # 2/3 rule: keep |k_i| < N/3
        keep = (kx.abs() < cutoff) & (ky.abs() < cutoff) & (kz.abs() < cutoff)
        self.dealias_XYK = keep.to(dtype)
        axis = torch.arange(n, dtype=dtype, device=device) * self.dx
        self.x_CXYZ = torch.stack(torch.meshgrid(axis, axis, axis, indexing="ij"))

    @property
    def complex_dtype(self):
        return torch.complex128 if self.dtype == torch.float64 else torch.complex64

    def fft(self, f: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfftn(f, dim=(-3, -2, -1))

    def ifft(self, fh: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfftn(fh, s=(self.n,) * 3, dim=(-3, -2, -1))

    def project(self, uh_CXYK: torch.Tensor) -> torch.Tensor:
        """Leray projection onto divergence-free fields: û - k (k·û) / |k|²."""
        k_dot_u = (self.k_CXYK * uh_CXYK).sum(0)
        return uh_CXYK - self.k_CXYK * (k_dot_u / self.k2_safe_XYK)

    def curl_hat(self, uh_CXYK: torch.Tensor) -> torch.Tensor:
        kx, ky, kz = self.k_CXYK
        ux, uy, uz = uh_CXYK
        return 1j * torch.stack([ky * uz - kz * uy, kz * ux - kx * uz, kx * uy - ky * ux])

    def div_hat(self, uh_CXYK: torch.Tensor) -> torch.Tensor:
        return 1j * (self.k_CXYK * uh_CXYK).sum(0)

    def grad_norm_rms(self, uh_CXYK: torch.Tensor) -> float:
        """rms over the grid of |∇u| (Frobenius norm of the velocity gradient), via Parseval."""
        grads = [self.ifft(1j * self.k_CXYK[i] * uh_CXYK) for i in range(3)]
        return float(torch.sqrt(sum((g**2).sum(0) for g in grads).mean()))

    def random_solenoidal(self, kmax: float, rms: float, generator: torch.Generator) -> torch.Tensor:
        """A random divergence-free field with energy in |k| <= kmax, scaled to the given rms."""
        shape = self.k_CXYK.shape
        noise = torch.randn(shape, dtype=self.dtype, generator=generator, device="cpu")
        phase = torch.randn(shape, dtype=self.dtype, generator=generator, device="cpu")
        uh = torch.complex(noise, phase).to(self.device) * (self.k2_XYK <= kmax**2)
        u = self.ifft(self.project(uh) * self.dealias_XYK)  # irfftn enforces Hermitian symmetry
        u = u - u.mean(dim=(-3, -2, -1), keepdim=True)
        return u * (rms / u.pow(2).mean().sqrt().clamp_min(1e-30))


def resample(u_CXYZ: torch.Tensor, n_out: int) -> torch.Tensor:
    """Spectral interpolation of a periodic field to an n_out^3 grid (zero-padding the modes).

    Exact for fields band-limited below both grids' Nyquist (dealiased solver states are).
    """
    n = u_CXYZ.shape[-1]
    half = min(n, n_out) // 2
    uh = torch.fft.rfftn(u_CXYZ, dim=(-3, -2, -1))
    out = torch.zeros((*u_CXYZ.shape[:-3], n_out, n_out, n_out // 2 + 1), dtype=uh.dtype, device=uh.device)
    for sx in (slice(0, half), slice(-half + 1, None)):
        for sy in (slice(0, half), slice(-half + 1, None)):
            out[..., sx, sy, :half] = uh[..., sx, sy, :half]
    return torch.fft.irfftn(out, s=(n_out,) * 3, dim=(-3, -2, -1)) * (n_out / n) ** 3


def relative_divergence(u_CXYZ: torch.Tensor, grid: SpectralGrid) -> dict[str, float]:
    """Spectral divergence of a stored field: max |div u| and that over rms |∇u|."""
    uh = grid.fft(u_CXYZ.to(grid.dtype))
    div = grid.ifft(grid.div_hat(uh))
    max_abs = float(div.abs().max())
    return {"max_abs": max_abs, "rel_max": max_abs / max(grid.grad_norm_rms(uh), 1e-300)}


def mirror_z(u_CXYZ: torch.Tensor) -> torch.Tensor:
    """Reflection z -> -z (mod L), with u_z negated: the mirror that makes z = L/2 free-slip."""
    flipped = torch.roll(torch.flip(u_CXYZ, dims=[-1]), shifts=1, dims=-1)
    return flipped * torch.tensor([1.0, 1.0, -1.0], dtype=u_CXYZ.dtype, device=u_CXYZ.device).view(3, 1, 1, 1)


@dataclass
class StepStats:
    dt: float
    drag_C: torch.Tensor  # mean momentum removed by the solid per unit time during the step


class NavierStokes:
    """Time stepper; `uh_CXYK` is the state, `t` the time.

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
        self.uh_CXYK = torch.zeros(grid.k_CXYK.shape, dtype=grid.complex_dtype, device=grid.device)
        self.t = 0.0
        self.drag_impulse_C = torch.zeros(3, dtype=torch.float64)  # ∫ drag dt, for momentum balance

    def set_velocity(self, u_CXYZ: torch.Tensor) -> None:
        self.uh_CXYK = self._constrain(u_CXYZ.to(self.grid.device, self.grid.dtype))

    def velocity(self) -> torch.Tensor:
        return self.grid.ifft(self.uh_CXYK)

    def _constrain(self, u_CXYZ: torch.Tensor) -> torch.Tensor:
        """Symmetrize (if mirrored), transform, project and truncate a physical field."""
        if self.mirror:
            u_CXYZ = 0.5 * (u_CXYZ + mirror_z(u_CXYZ))
        return self.grid.project(self.grid.fft(u_CXYZ)) * self.grid.dealias_XYK

    def _rhs(self, uh_CXYK: torch.Tensor, t: float) -> torch.Tensor:
        g = self.grid
        u = g.ifft(uh_CXYK)
        omega = g.ifft(g.curl_hat(uh_CXYK))
        nonlinear = torch.linalg.cross(u, omega, dim=0)
        force = self.forcing(t).to(g.device, g.dtype).view(3, 1, 1, 1)
        return g.project(g.fft(nonlinear + force)) * g.dealias_XYK

    def stable_dt(self, cfl: float, max_dt: float) -> float:
        u = self.velocity()
        speed = float(u.abs().sum(0).max())
        return min(max_dt, cfl * self.grid.dx / speed) if speed > 0 else max_dt

    def step(self, dt: float) -> StepStats:
        g, t = self.grid, self.t
        e_full = torch.exp(-self.nu * g.k2_XYK * dt)
        e_half = torch.exp(-self.nu * g.k2_XYK * dt / 2)
        # SSP-RK3 on v = exp(ν k² τ) û, written back in û; stages sit at t + dt, t + dt/2, t + dt.
        u0 = self.uh_CXYK
        n0 = self._rhs(u0, t)
        u1 = e_full * (u0 + dt * n0)
        u2 = 0.75 * e_half * u0 + 0.25 * (e_half * (u0 + dt * n0) + dt * self._rhs(u1, t + dt) / e_half)
        u3 = (1 / 3) * e_full * u0 + (2 / 3) * e_half * (u2 + dt * self._rhs(u2, t + dt / 2))
        self.t = t + dt
        drag = torch.zeros(3, dtype=torch.float64)
        if self.chi_XYZ is None and not self.mirror:
            self.uh_CXYK = u3
        else:
            u = g.ifft(u3)
            if self.chi_XYZ is not None:
                removed = u * (1 - torch.exp(-self.chi_XYZ * (dt / self.eta)))
                u = u - removed
                drag = removed.mean(dim=(-3, -2, -1)).to(torch.float64).cpu() / dt
            self.uh_CXYK = self._constrain(u)
        self.drag_impulse_C += drag * dt
        return StepStats(dt=dt, drag_C=drag)

    def advance(self, duration: float, cfl: float, max_dt: float, on_step=None) -> int:
        """Advance by `duration` with CFL-limited steps; the last step lands exactly on time."""
        t_end, steps = self.t + duration, 0
        while self.t < t_end - 1e-12 * max(1.0, abs(t_end)):
            dt = min(self.stable_dt(cfl, max_dt), t_end - self.t)
            stats = self.step(dt)
            steps += 1
            if not torch.isfinite(self.uh_CXYK).all():
                raise FloatingPointError(f"solver diverged at t={self.t:.4g} (dt={dt:.3g}); lower cfl/max_dt")
            if on_step is not None:
                on_step(stats)
        return steps
