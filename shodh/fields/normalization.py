"""Affine normalizations of fields: the tokenizer's per-domain velocity map and the per-channel
latent map of the latent manifest's statistics.

Shape legend (the project's): B batch, C channels/components (3 velocity components or latent
channels), X Y Z grid axes (N each), H the halved rfft axis (N // 2 + 1), S spectral shells,
T frames of a trajectory.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from shodh.errors import DataError


@dataclasses.dataclass(frozen=True)
class Normalization:
    """Per-domain affine map between physical velocity u and normalized v: u = mean + scale * v.

    One scalar scale per domain (a per-component scale would break div u = 0). `std` (per
    component, physical units) only weights the loss so that every component counts as in
    VRMSE; it is not part of the map.
    """

    mean: dict[str, list[float]]
    scale: dict[str, float]
    std: dict[str, list[float]]

    @classmethod
    def from_raw_stats(cls, stats: dict) -> "Normalization":
        """From the raw manifest's {domain: {"mean": [3], "std": [3]}}; scale = rms of the stds."""
        mean = {d: [float(x) for x in s["mean"]] for d, s in stats.items()}
        std = {d: [max(float(x), 1e-12) for x in s["std"]] for d, s in stats.items()}
        scale = {d: math.sqrt(sum(x * x for x in s) / 3) for d, s in std.items()}
        return cls(mean, scale, std)

    def _domain(self, domain: str) -> str:
        if domain not in self.scale:
            known = ", ".join(self.scale)
            raise DataError(f"domain '{domain}': the tokenizer has no statistics for it (known: {known})")
        return domain

    def normalize(self, u_BCXYZ: torch.Tensor, domain: str) -> torch.Tensor:
        """Physical [..., 3, X, Y, Z] -> normalized, in u's dtype: (u - mean) / scale."""
        d = self._domain(domain)
        mean = torch.tensor(self.mean[d], dtype=u_BCXYZ.dtype, device=u_BCXYZ.device).view(3, 1, 1, 1)
        return (u_BCXYZ - mean) / self.scale[d]

    def denormalize(self, v_BCXYZ: torch.Tensor, domain: str) -> torch.Tensor:
        """Normalized [..., 3, X, Y, Z] -> physical, in v's dtype: mean + scale * v."""
        d = self._domain(domain)
        mean = torch.tensor(self.mean[d], dtype=v_BCXYZ.dtype, device=v_BCXYZ.device).view(3, 1, 1, 1)
        return mean + self.scale[d] * v_BCXYZ

    def loss_weights(self, domain: str) -> list[float]:
        """Per-component weights scale² / std_c²: the loss becomes a VRMSE²-like average."""
        d = self._domain(domain)
        return [self.scale[d] ** 2 / s**2 for s in self.std[d]]

    def to_json(self) -> dict:
        return {d: {"mean": self.mean[d], "scale": self.scale[d], "std": self.std[d]} for d in self.scale}

    @classmethod
    def from_json(cls, data: dict) -> "Normalization":
        return cls({d: v["mean"] for d, v in data.items()}, {d: v["scale"] for d, v in data.items()},
                   {d: v["std"] for d, v in data.items()})


@dataclasses.dataclass(frozen=True)
class LatentNorm:
    """Per-channel latent normalization z_n = (z - mean_C) / std_C, inverse z = z_n * std_C + mean_C.

    Latent shards store raw encoder output; the latent manifest's `stats` {"mean": [C],
    "std": [C]} normalize it for the model. The constants are float32 (the latents' dtype) for
    numpy arrays and torch tensors alike, and the arithmetic is exactly the two expressions
    above, so every stage that (de)normalizes gets the same bits. A frozen dataclass of tuples:
    small and picklable (DataLoader workers carry it).
    """

    mean_C: tuple[float, ...]
    std_C: tuple[float, ...]

    @classmethod
    def from_stats(cls, stats: dict) -> "LatentNorm":
        return cls(tuple(float(m) for m in stats["mean"]), tuple(float(s) for s in stats["std"]))

    def _constants(self, like):
        """(mean, std) shaped [C, 1, 1, 1] float32, numpy or torch (on like's device) as `like`."""
        if isinstance(like, torch.Tensor):
            return (torch.tensor(self.mean_C, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1),
                    torch.tensor(self.std_C, dtype=torch.float32, device=like.device).view(-1, 1, 1, 1))
        return (np.asarray(self.mean_C, np.float32)[:, None, None, None],
                np.asarray(self.std_C, np.float32)[:, None, None, None])

    def normalize(self, z_CXYZ):
        """Raw latents [..., C, X, Y, Z] (numpy or torch) -> normalized: (z - mean) / std."""
        mean, std = self._constants(z_CXYZ)
        return (z_CXYZ - mean) / std

    def normalize_(self, z_CXYZ: torch.Tensor) -> torch.Tensor:
        """`normalize` in place on a float32 tensor the caller owns: the same bits (IEEE subtract, then
        divide), no temporaries."""
        mean, std = self._constants(z_CXYZ)
        return z_CXYZ.sub_(mean).div_(std)

    def denormalize(self, z_CXYZ):
        """Normalized latents [..., C, X, Y, Z] (numpy or torch) -> raw: z * std + mean."""
        mean, std = self._constants(z_CXYZ)
        return z_CXYZ * std + mean
