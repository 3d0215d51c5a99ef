"""Field maths shared by every stage: a leaf package (imports nothing from shodh but `shodh.errors`).

Modules:
- `spectral.py`: wavenumbers, the rfft pair, Leray projection, the matching curl / divergence /
  gradient pairs ("spectral", "staggered"), Biot–Savart, spectral resampling, and the solver's
  `SpectralGrid`.
- `metrics.py`: pure evaluation metrics of predicted fields (MSE, nRMSE, VRMSE, energy spectra,
  banded spectral error).
- `normalization.py`: the tokenizer's per-domain velocity `Normalization` and the per-channel
  latent `LatentNorm`.

Shape legend (the project's): B batch, C channels/components (3 velocity components or latent
channels), X Y Z grid axes (N each), H the halved rfft axis (N // 2 + 1), S spectral shells,
T frames of a trajectory.
"""
