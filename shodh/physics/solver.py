"""Pseudo-spectral incompressible Navier–Stokes in a periodic box, with Brinkman penalization.

Shape legend (the project's, see shodh/fields): C = 3 velocity components (x, y, z); X, Y, Z =
grid axes (N each); H = the halved rfft axis along z (N // 2 + 1). Physical fields are
`*_CXYZ` / `*_XYZ`. The state lives in the **kept** spectral block `*_CKKM`: the modes the 2/3
rule keeps, |k_i| <= M - 1 with M = (N - 1) // 3 + 1, stored in FFT order on each axis
(K = 2M - 1 entries along x and y: 0 .. M-1 then -(M-1) .. -1; M along z: 0 .. M-1). A
dealiased field has nothing outside that block, so every elementwise spectral operation works
on (2/3)^3 ≈ 30 % of the rfft array; the FFTs pad it with zeros (`_Block`).

Equations (box [0, L)^3, default L = 2π), with penalization force -χ u / η (χ = 1 in solids):
  du/dt = ν ∇²u + P[u × ω + f] - P[χ u] / η,   ∇·u = 0     (rotational form, Leray projector P)

Scheme, per step of size h:
1. Explicit part, Heun's third-order Runge–Kutta on u × ω + f with an integrating factor
   exp(-ν k² τ) for viscosity (Lawson; its stages never run backwards in time, so all factors
   decay and any ν k² dt is safe), 2/3-rule dealiasing of the nonlinear term: gives ũ (divergence-free,
   dealiased, not yet penalized).
2. Penalization, implicit and projected, consistent with the exponential integrator: solve
       u + φ(k) P D[χ u] / η = ũ,   φ(k) = (1 - exp(-ν k² h)) / (ν k²)   (φ(0) = h)
   for the divergence-free, dealiased u (D = 2/3 truncation) by preconditioned conjugate
   gradients (the operator is symmetric positive definite on that subspace, see `_penalize`).
   This is exponential-Euler with the penalization force taken at the new time: its fixed
   points satisfy ν ∇²u + f - P D[χ u] / η = 0 exactly when advection is negligible, i.e. a
   Stokes steady state (the porous permeability, a sphere's drag) does not depend on the time
   step (with advection, its term enters the fixed point weighted by the integrating factors: a
   small dt dependence, at low Reynolds number a negligible one). Velocity in the solid and
   divergence are removed together rather than one after the other. First order in time for
   the stiff penalization (L-stable, any η, any h); the explicit part stays third order.
   Started from the linear extrapolation of the last two states, it takes a few iterations.
3. Optional mirror symmetry in z (u_x, u_y even, u_z odd about z = 0 and z = L/2) enforced on
   the spectral coefficients (it makes z = L/2 a free-slip plane).

Cost: 4.5 FFT pairs per RK stage (u and ω back to physical space, u × ω forward) plus 3 pairs
per conjugate-gradient iteration (p to physical space, χ p back). The CFL speed comes from the first stage's physical u, and the
exponentials are cached per time step (CFL steps are quantized to max_dt · 2^(-j/8)).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

from shodh.fields.spectral import SpectralGrid, fft, ifft

Forcing = Callable[[float], torch.Tensor]  # t -> body force [3] (uniform in space)

DT_LEVELS_PER_OCTAVE = 8  # CFL steps snap down to max_dt * 2^(-j/8): at most 9 % below the CFL limit
# Relative residual of the penalization solve. float32 at 1e-4 moves a porous flux by < 1e-4
# against 1e-5 (measured) at two thirds of the iterations.
CG_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4}
CG_MAX_ITERS = 200


def mirror_z(u_CXYZ: torch.Tensor) -> torch.Tensor:
    """Reflection z -> -z (mod L), with u_z negated: the mirror that makes z = L/2 free-slip."""
    flipped = torch.roll(torch.flip(u_CXYZ, dims=[-1]), shifts=1, dims=-1)
    return flipped * torch.tensor([1.0, 1.0, -1.0], dtype=u_CXYZ.dtype, device=u_CXYZ.device).view(3, 1, 1, 1)


def band_limit(n: int) -> int:
    """Largest |k_i| the 2/3 rule keeps on an N-point axis: every stored field has no energy past it."""
    return (n - 1) // 3


class _Block:
    """The kept spectral block of an N^3 grid and its wavenumbers; to / from full rfft arrays."""

    def __init__(self, grid: SpectralGrid):
        n, dev = grid.n, grid.device
        self.n, self.m = n, band_limit(n) + 1
        m, cdt = self.m, grid.complex_dtype
        scale = 2 * math.pi / grid.length
        signed = torch.cat([torch.arange(m), torch.arange(-(m - 1), 0)]).to(grid.dtype) * scale
        self.kx = signed.to(dev).view(-1, 1, 1)
        self.ky = signed.to(dev).view(1, -1, 1)
        self.kz = (torch.arange(m, dtype=grid.dtype) * scale).to(dev).view(1, 1, -1)
        self.k2 = self.kx**2 + self.ky**2 + self.kz**2  # [K, K, M]
        inv_k2 = torch.where(self.k2 > 0, 1 / torch.where(self.k2 > 0, self.k2, 1.0), 0.0)
        # Complex copies of the multipliers: a real factor on a complex tensor costs a conversion per use.
        self.ik = [(1j * k).to(cdt) for k in (self.kx, self.ky, self.kz)]
        self.kc = [k.to(cdt) for k in (self.kx, self.ky, self.kz)]
        self.inv_k2c = inv_k2.to(cdt)
        # (block slice, full-array slice) along x and y: non-negative then negative wavenumbers.
        self.pairs = [(slice(0, m), slice(0, m)), (slice(m, 2 * m - 1), slice(n - m + 1, n))]
        self._buffers: dict[tuple, torch.Tensor] = {}
        self.transforms = 0  # scalar N^3 FFTs done, forward and inverse (for benchmarks)

    def from_full(self, fh_XYH: torch.Tensor) -> torch.Tensor:
        lead, m = fh_XYH.shape[:-3], self.m
        out = fh_XYH.new_empty((*lead, 2 * m - 1, 2 * m - 1, m))
        for bx, fx in self.pairs:
            for by, fy in self.pairs:
                out[..., bx, by, :] = fh_XYH[..., fx, fy, :m]
        return out

    def to_full(self, bh: torch.Tensor) -> torch.Tensor:
        """Zero-padded rfft array [..., N, N, N//2+1]; a buffer reused per shape (read it before the next call)."""
        key = (bh.shape[:-3], bh.dtype)
        full = self._buffers.get(key)
        if full is None:
            n = self.n
            full = self._buffers[key] = bh.new_zeros((*bh.shape[:-3], n, n, n // 2 + 1))
        for bx, fx in self.pairs:
            for by, fy in self.pairs:
                full[..., fx, fy, : self.m] = bh[..., bx, by, :]
        return full

    def physical(self, bh: torch.Tensor) -> torch.Tensor:
        self.transforms += bh[..., 0, 0, 0].numel()
        return ifft(self.to_full(bh), self.n)

    def spectral(self, f_XYZ: torch.Tensor) -> torch.Tensor:
        self.transforms += f_XYZ[..., 0, 0, 0].numel()
        return self.from_full(fft(f_XYZ))

    def project_(self, uh_CKKM: torch.Tensor) -> torch.Tensor:
        """Leray projection û - k (k·û) / |k|² (the mean mode kept), in place."""
        kx, ky, kz = self.kc
        s = uh_CKKM[0] * kx
        s.addcmul_(uh_CKKM[1], ky).addcmul_(uh_CKKM[2], kz).mul_(self.inv_k2c)
        for c, k in enumerate(self.kc):
            uh_CKKM[c].addcmul_(s, k, value=-1)
        return uh_CKKM

    def with_curl(self, uh_CKKM: torch.Tensor) -> torch.Tensor:
        """[û; i k × û]: the velocity and vorticity blocks stacked, [6, K, K, M]."""
        out = uh_CKKM.new_empty((6, *uh_CKKM.shape[1:]))
        out[:3] = uh_CKKM
        ik = self.ik
        for c in range(3):  # ω_c = i k_{c+1} û_{c+2} - i k_{c+2} û_{c+1} (indices mod 3)
            a, b = (c + 1) % 3, (c + 2) % 3
            torch.mul(ik[a], uh_CKKM[b], out=out[3 + c]).addcmul_(ik[b], uh_CKKM[a], value=-1)
        return out

    def dot(self, a: torch.Tensor, b: torch.Tensor) -> float:
        """Real inner product over the full spectrum (Parseval, up to N^3): a mode 0 < kz stands
        for itself and its conjugate, the kz = 0 plane holds both of each pair."""
        whole = torch.vdot(a.reshape(-1), b.reshape(-1)).real.item()
        return 2.0 * whole - torch.vdot(a[..., 0].reshape(-1), b[..., 0].reshape(-1)).real.item()

    def mirror(self, uh_CKKM: torch.Tensor) -> torch.Tensor:
        """Average with the z-mirror image: ĥ(kx, ky, kz) = ±conj ĥ(-kx, -ky, kz) (+ for u_x, u_y, - for u_z)."""
        negated = torch.roll(torch.flip(uh_CKKM, dims=[-3, -2]), shifts=(1, 1), dims=(-3, -2)).conj()
        negated[2] = -negated[2]
        return 0.5 * (uh_CKKM + negated)


@dataclass
class StepStats:
    dt: float
    drag_C: torch.Tensor  # mean momentum removed by the solid per unit time during the step
    cg_iterations: int = 0


class NavierStokes:
    """Time stepper; the state is `uh_CKKM` (kept spectral block), `t` the time.

    `chi_XYZ` is the solid indicator (1 in solid cells, 0 in fluid), `eta` the penalization
    time scale. `uh_CXYH` returns the state as a full rfft array.
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
        self.block = _Block(grid)
        self.chi_XYZ = None if chi_XYZ is None else chi_XYZ.to(grid.device, grid.dtype)
        shape = (3, 2 * self.block.m - 1, 2 * self.block.m - 1, self.block.m)
        self.uh_CKKM = torch.zeros(shape, dtype=grid.complex_dtype, device=grid.device)
        self.t = 0.0
        self.drag_impulse_C = torch.zeros(3, dtype=torch.float64)  # ∫ drag dt, for momentum balance
        self._factors: OrderedDict[float, dict] = OrderedDict()
        self._u_CXYZ: torch.Tensor | None = None  # physical velocity of the current state, when known
        self._previous: torch.Tensor | None = None  # the state one step back
        self.cg_iterations = 0  # total, for benchmarks

    # ------------------------------------------------------------ state

    def set_velocity(self, u_CXYZ: torch.Tensor) -> None:
        uh = self.block.project_(self.block.spectral(u_CXYZ.to(self.grid.device, self.grid.dtype)))
        self.uh_CKKM = self.block.mirror(uh) if self.mirror else uh
        self._u_CXYZ = self._previous = None

    def velocity(self) -> torch.Tensor:
        if self._u_CXYZ is None:
            self._u_CXYZ = self.block.physical(self.uh_CKKM)
        return self._u_CXYZ

    @property
    def uh_CXYH(self) -> torch.Tensor:
        return self.block.to_full(self.uh_CKKM).clone()

    # ------------------------------------------------------------ pieces

    def _coefficients(self, dt: float) -> dict:
        """Integrating factors and the penalization weights for one step size (cached)."""
        if dt in self._factors:
            self._factors.move_to_end(dt)
            return self._factors[dt]
        b, cdt = self.block, self.grid.complex_dtype
        a = self.nu * b.k2 * dt
        phi = torch.where(a > 0, -torch.expm1(-a) / torch.where(a > 0, self.nu * b.k2, 1.0), dt)
        out = {
            "third": torch.exp(-a / 3).to(cdt), "two_thirds": torch.exp(-2 * a / 3).to(cdt), "full": torch.exp(-a).to(cdt),
            # The solve's operator is (eta / phi) I + P D chi (symmetric positive definite).
            "eta_over_phi": (self.eta / phi).to(cdt),
        }
        self._factors[dt] = out
        if len(self._factors) > 16:
            self._factors.popitem(last=False)
        return out

    def _rhs(self, uh_CKKM: torch.Tensor, t: float, want_velocity: bool = False):
        """Dealiased, projected u × ω + f (block), and the physical u when asked."""
        b = self.block
        uw_6XYZ = b.physical(b.with_curl(uh_CKKM))
        u, w = uw_6XYZ[:3], uw_6XYZ[3:]
        cross = torch.empty_like(u)
        for c in range(3):  # (u × ω)_c = u_{c+1} ω_{c+2} - u_{c+2} ω_{c+1}
            a, d = (c + 1) % 3, (c + 2) % 3
            torch.mul(u[a], w[d], out=cross[c]).addcmul_(u[d], w[a], value=-1)
        nh = b.spectral(cross)
        # A uniform force is the mean mode only (unnormalized FFT: times N^3).
        nh[:, 0, 0, 0] += self.forcing(t).to(nh.device, self.grid.dtype) * self.grid.n**3
        b.project_(nh)
        return (nh, u) if want_velocity else nh

    def _penalize(self, target: torch.Tensor, eta_over_phi: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Solve (eta/phi) u + P D[chi u] = (eta/phi) ũ for divergence-free, dealiased u (PCG).

        Symmetric positive definite: eta/phi > 0 is diagonal in k and P D chi D P is a product
        of orthogonal projections and a non-negative multiplier. Preconditioner: diagonal
        eta/phi + mean(chi). Starts from the linear extrapolation of the last two states (the
        current state on a first step). Stops at CG_MAX_ITERS whatever the residual (the float64
        sphere-array runs at dt = 5, the hardest case measured, average 80-150 per step).
        """
        b, chi = self.block, self.chi_XYZ
        rhs = eta_over_phi * target

        def apply(p):
            return b.project_(b.spectral(b.physical(p).mul_(chi))).addcmul_(eta_over_phi, p)

        precond = 1.0 / (eta_over_phi + float(chi.mean()))
        x = self.uh_CKKM.clone()
        if self._previous is not None:  # linear extrapolation in time: the solve's start
            x.mul_(2).sub_(self._previous)
        r = rhs - apply(x)
        z = precond * r
        p = z.clone()
        # Stop on the preconditioned residual (r·M⁻¹r, which CG computes anyway) relative to
        # the right-hand side's: one inner product per iteration fewer than on |r|.
        tol2 = CG_RTOL[self.grid.dtype] ** 2 * b.dot(rhs, precond * rhs)
        rz, iters = b.dot(r, z), 0
        while rz > tol2 and iters < CG_MAX_ITERS:
            ap = apply(p)
            alpha = rz / b.dot(p, ap)
            x.add_(p, alpha=alpha)
            r.add_(ap, alpha=-alpha)
            torch.mul(precond, r, out=z)
            rz_new = b.dot(r, z)
            p.mul_(rz_new / rz).add_(z)
            rz = rz_new
            iters += 1
        return x, iters

    # ------------------------------------------------------------ stepping

    def cfl_dt(self, speed: float, cfl: float, max_dt: float) -> float:
        """The largest dt on the ladder max_dt * 2^(-j/8) within cfl * dx / speed."""
        if speed <= 0:
            return max_dt
        limit = cfl * self.grid.dx / speed
        if limit >= max_dt:
            return max_dt
        j = math.ceil(DT_LEVELS_PER_OCTAVE * math.log2(max_dt / limit) - 1e-9)
        return max_dt * 2.0 ** (-j / DT_LEVELS_PER_OCTAVE)

    def stable_dt(self, cfl: float, max_dt: float) -> float:
        return self.cfl_dt(float(self.velocity().abs().sum(0).max()), cfl, max_dt)

    def step(self, dt: float | Callable[[float], float]) -> StepStats:
        """One step; `dt` is a size or a function of the CFL speed max |u_x| + |u_y| + |u_z|."""
        t, u0 = self.t, self.uh_CKKM
        n0, u_phys = self._rhs(u0, t, want_velocity=True)
        if callable(dt):
            dt = dt(float(u_phys.abs().sum(0).max()))
        c = self._coefficients(dt)
        # Heun's RK3 on v = exp(ν k² τ) û (Lawson), written back in û. Its stages sit at t, t + dt/3,
        # t + 2dt/3: never earlier than the stages they use, so every factor decays (a scheme
        # with a stage before its predecessor, like SSP-RK3's, multiplies by exp(+ν k² dt / 2)
        # and amplifies round-off without bound at large ν k² dt).
        u1 = c["third"] * (u0 + (dt / 3) * n0)
        u2 = c["two_thirds"] * u0 + (2 * dt / 3) * c["third"] * self._rhs(u1, t + dt / 3)
        u3 = c["full"] * (u0 + (dt / 4) * n0) + (3 * dt / 4) * c["third"] * self._rhs(u2, t + 2 * dt / 3)
        drag, iters = torch.zeros(3, dtype=torch.float64), 0
        if self.chi_XYZ is not None:
            penalized, iters = self._penalize(u3, c["eta_over_phi"])
            # The mean mode is not projected: what the solve removed from it is the solid's drag.
            drag = ((u3[:, 0, 0, 0] - penalized[:, 0, 0, 0]).real / (dt * self.grid.n**3)).to(torch.float64).cpu()
            u3 = penalized
        self._previous = self.uh_CKKM
        # Each stage is divergence-free in exact arithmetic; projecting the new state keeps the
        # round-off in k·û from adding up over thousands of steps (cheap: the block only).
        u3 = self.block.project_(self.block.mirror(u3) if self.mirror else u3)
        self.uh_CKKM = u3
        self._u_CXYZ = None
        self.t = t + dt
        self.drag_impulse_C += drag * dt
        self.cg_iterations += iters
        return StepStats(dt=dt, drag_C=drag, cg_iterations=iters)

    def advance(self, duration: float, cfl: float, max_dt: float, on_step=None) -> int:
        """Advance by `duration` with CFL-limited steps; the last step lands exactly on time."""
        t_end, steps = self.t + duration, 0
        while self.t < t_end - 1e-12 * max(1.0, abs(t_end)):
            remaining = t_end - self.t
            stats = self.step(lambda speed, remaining=remaining: min(self.cfl_dt(speed, cfl, max_dt), remaining))
            steps += 1
            if not torch.isfinite(self.uh_CKKM).all():
                raise FloatingPointError(f"solver diverged at t={self.t:.4g} (dt={stats.dt:.3g}); lower cfl/max_dt")
            if on_step is not None:
                on_step(stats)
        return steps
