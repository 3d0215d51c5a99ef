"""What a linear compressor of the tokenizer's size reaches on a workspace's data: the reference
any learned tokenizer is judged against.

For each latent channel count C, a 16^3 x C latent holds B = 16^3 C reals per field. The
reference keeps the Fourier modes of the velocity that carry the most energy on average over
the train split (per domain; on a homogeneous axis Fourier modes are the POD modes) until the
kept modes hold B reals: a divergence-free field has 2 free real components per complex mode
(the mean mode 3), and the rfft's interior modes stand for a conjugate pair (`weights_XYH`).
Every other mode is zeroed, and the split's fields are scored with the tokenizer's metric
(The Well's VRMSE, per component, then averaged).

    .venv/bin/python benchmarks/tokenizer_reference.py --root ROOT [--split val] [--channels 4 8 16]

Prints one JSON object: {"split", "grid", "channels": {C: {domain: vrmse}},
"components": {C: {domain: [vrmse of u_x, u_y, u_z]}}} (the tokenizer logs the same split as
`<split>/<domain>/vrmse_ux` ... `_uz`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from shodh.fields.metrics import shells_and_weights_XYH, vrmse_BC
from shodh.fields.spectral import fft, ifft
from shodh.tokenizer.data import domain_frames, load_raw_manifest
from shodh.workspace import LATENT


def fields_of(manifest: dict, root: Path, split: str, domain: str) -> list[torch.Tensor]:
    """The split's velocity fields of one domain, float64 [3, N, N, N] each."""
    return [torch.from_numpy(u).double() for u, _ in domain_frames(manifest, root, split, domain)]


def mode_order_XYH(train: list[torch.Tensor]) -> torch.Tensor:
    """Rank of every rfft mode [N, N, H] by its mean energy over `train` fields (0 = most)."""
    power_XYH = torch.stack([fft(u).abs().pow(2).sum(0) for u in train]).mean(0)
    ranks = torch.empty(power_XYH.numel(), dtype=torch.long)
    ranks[power_XYH.flatten().argsort(descending=True)] = torch.arange(power_XYH.numel())
    return ranks.view_as(power_XYH)


def kept_modes_XYH(order_XYH: torch.Tensor, budget: int) -> torch.Tensor:
    """1 for the most energetic modes whose real degrees of freedom fit in `budget`, else 0."""
    n = order_XYH.shape[0]
    _, weights_XYH = shells_and_weights_XYH(n, torch.device("cpu"))
    dof_XYH = 2 * weights_XYH
    dof_XYH[0, 0, 0] = 3  # the mean flow: three free components
    by_rank = torch.empty(order_XYH.numel(), dtype=torch.float64)
    by_rank[order_XYH.flatten()] = dof_XYH.flatten()
    fits = by_rank.cumsum(0) <= budget
    return fits[order_XYH].double()


def reference_vrmse_C(train: list[torch.Tensor], fields: list[torch.Tensor], channels: int) -> np.ndarray:
    """VRMSE per velocity component [3], averaged over `fields`, of the fields kept to the train
    split's most energetic modes that a 16^3 x `channels` latent could hold."""
    n = fields[0].shape[-1]
    keep_XYH = kept_modes_XYH(mode_order_XYH(train), channels * LATENT**3)
    return np.mean([vrmse_BC(ifft(fft(u) * keep_XYH, n)[None], u[None])[0].numpy() for u in fields], axis=0)


def reference_vrmse(train: list[torch.Tensor], fields: list[torch.Tensor], channels: int) -> float:
    """The tokenizer's score (VRMSE averaged over components) of `reference_vrmse_C`."""
    return float(reference_vrmse_C(train, fields, channels).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="workspace with raw/")
    parser.add_argument("--split", default="val", choices=("train", "val", "test"))
    parser.add_argument("--channels", type=int, nargs="+", default=[4, 8, 16])
    args = parser.parse_args()
    manifest = load_raw_manifest(args.root)
    out: dict = {"split": args.split, "grid": manifest["grid"], "channels": {}, "components": {}}
    for domain in manifest["domains"]:
        train, fields = fields_of(manifest, args.root, "train", domain), fields_of(manifest, args.root, args.split, domain)
        if not train or not fields:
            continue
        for c in args.channels:
            vrmse_C = reference_vrmse_C(train, fields, c)
            out["channels"].setdefault(c, {})[domain] = round(float(vrmse_C.mean()), 4)
            out["components"].setdefault(c, {})[domain] = [round(float(v), 4) for v in vrmse_C]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
