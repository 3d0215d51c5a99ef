"""`shodh audit`: divergence of decoded fields in float64, with the operator the decoder uses.

Cases: decoded random latents (z ~ N(0, 1)) and decoded encodings of real raw fields (the
first frame of each domain's first held-out, else train, trajectory). `--grid N` audits an
N^3 decoder: the trained tokenizer when its grid is N, otherwise a freshly initialized network
of the configured architecture at N (the zero-divergence property is structural, so it does
not depend on training), with raw fields Fourier-resampled to N^3 (they are band-limited).
Relative numbers divide by the rms over the batch of |∇u| with the same operator.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from shodh.errors import DataError
from shodh.fields.normalization import Normalization
from shodh.fields.spectral import divergence_stats, resample, resample_mask
from shodh.physics.solver import band_limit
from shodh.tokenizer.data import data_band, load_raw_manifest, raw_frames, shards_of
from shodh.tokenizer.model import TokenizerNet, build_net, load_tokenizer, reconstruct
from shodh.workspace import LATENT, raw_manifest_path, tokenizer_dir


def real_fields(manifest: dict, root: Path, n: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(domain, u [3,n,n,n] float64, mask [n,n,n]) for one frame per domain, resampled to n^3."""
    out = []
    for domain in manifest["domains"]:
        for split in ("val", "test", "train"):
            shards = [s for s in shards_of(manifest, root, split) if s["domain"] == domain]
            if shards:
                first = None
                for item in raw_frames(shards[0]):  # to the end: the checksum is verified there
                    first = item if first is None else first
                if first is None:
                    raise DataError(f"{shards[0]['file']}: no frames")
                u, mask, _ = first
                u = torch.from_numpy(u).double()
                # At the decoder's grid the stored field is used as is (resample would also drop
                # its ~0 Nyquist plane).
                out.append((domain, u if u.shape[-1] == n else resample(u, n),
                            resample_mask(torch.from_numpy(mask.astype(np.float32)), n)))
                break
    return out


def audit_fields(u_BCXYZ: torch.Tensor, operator: str) -> dict:
    """Float64 divergence statistics of decoded fields, naming the operator and dtype."""
    stats = divergence_stats(u_BCXYZ.double(), operator)
    return {"operator": operator, "dtype": "float64", **stats}


@torch.no_grad()
def audit_net(net: TokenizerNet, norm: Normalization, manifest: dict | None,
              root: Path, device: torch.device, seed: int = 0, gains: dict | None = None) -> dict:
    """Audit one decoder at its own grid (with its spectral `gains` when it has them): random
    latents + real encodings; the summary keys (max_abs, rel_max, rel_rms) are the worst case
    over all cases."""
    n, operator = net.grid, net.operator
    fields = real_fields(manifest, root, n) if manifest else []
    masks = torch.stack([m for _, _, m in fields]) if fields else torch.zeros(2, n, n, n)
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(len(masks), net.channels, LATENT, LATENT, LATENT, generator=gen)
    w = net.decode(z.to(device), masks.to(device))
    cases = {"random_latent": audit_fields(net.velocity(w.double()), operator)}
    for domain, u, mask in fields:
        _, decoded = reconstruct(net, norm, u[None].to(device), mask[None].to(device), domain, gains)
        cases[f"encoded_{domain}"] = audit_fields(decoded, operator)
    worst = {k: max(c[k] for c in cases.values()) for k in ("max_abs", "rel_max", "rel_rms")}
    return {"operator": operator, "dtype": "float64", "grid": n, **worst, "cases": cases}


def run_audit(cfg, root: Path, grid: int | None = None) -> dict:
    """What `shodh audit` prints: the trained tokenizer at its grid, else a fresh network at `grid`."""
    root = Path(root)
    tok = load_tokenizer(root) if (tokenizer_dir(root) / "tokenizer.json").exists() else None
    n = grid or (tok.grid if tok else cfg.sim.grid)
    raw = raw_manifest_path(root)
    # Any raw grid will do: real fields are resampled to n^3.
    manifest = load_raw_manifest(root) if raw.exists() else None
    if tok is not None and tok.grid == n:
        net, norm, gains, weights = tok.net, tok.norm, tok.gains, f"trained {tok.id}"
    else:
        torch.manual_seed(cfg.seed)
        # The band a tokenizer trained on this data would get, at the audited grid.
        band = band_limit(n) if manifest is None or data_band(manifest) is not None else None
        net, gains, weights = build_net({**cfg.tokenizer.architecture(), "band": band}, n).eval(), None, "random-init"
        norm = tok.norm if tok else Normalization.from_raw_stats(manifest["stats"] if manifest else {})
    report = audit_net(net, norm, manifest, root, torch.device("cpu"), seed=cfg.seed, gains=gains)
    return {**report, "weights": weights, "relative_to": "rms |grad u| (Frobenius), same operator",
            "target_rel_max": 1e-12, "ok": report["rel_max"] <= 1e-12}
