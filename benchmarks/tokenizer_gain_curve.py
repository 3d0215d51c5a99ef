"""A trained tokenizer's VRMSE against its spectrum, one row per `tokenizer.spectrum_target`: the
spectral gain refit on the train split to each target (`train.spectral_gain`, the same train
spectra for all), then val and test evaluated with it (`train.evaluate`). Nothing is retrained
or written: this chooses the target for a tokenizer (README, Stage 2).

    .venv/bin/python benchmarks/tokenizer_gain_curve.py --root ROOT [--targets 0,0.5,0.8,1]

Prints one JSON object per target (`tokenizer`: the id of the tokenizer loaded, whose stored
gain is not used here), then a markdown table (val / test).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shodh.distributed import choose_device, dist_info
from shodh.tokenizer import load_tokenizer
from shodh.tokenizer.data import load_raw_manifest
from shodh.tokenizer.model import gain_multipliers
from shodh.tokenizer.train import evaluate, mean_spectra, spectral_gain

COLUMNS = ("vrmse", "spectrum_ratio_min", "leak_solid")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="workspace with raw/ and tokenizer/")
    parser.add_argument("--targets", default="0,0.5,0.6,0.7,0.8,0.9,1",
                        help="comma-separated spectrum targets in [0, 1]")
    parser.add_argument("--max-fields", type=int, default=0, help="held-out fields per domain; 0 = all")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    targets = [float(t) for t in args.targets.split(",")]
    if any(not 0 <= t <= 1 for t in targets):
        parser.error(f"--targets: each must be in [0, 1], got {args.targets}")
    device = choose_device(args.device, dist_info())
    tok = load_tokenizer(args.root, device)
    manifest = load_raw_manifest(args.root)
    spectra = mean_spectra(tok.net, tok.norm, manifest, args.root, device)
    rows = []
    for target in targets:
        gains = gain_multipliers({d: spectral_gain(e_true, e_dec, tok.net.k_max, target)
                                  for d, (e_true, e_dec) in spectra.items()}, manifest["grid"], device)
        metrics = {}
        for split in ("val", "test"):
            metrics.update(evaluate(tok.net, tok.norm, manifest, args.root, split, args.max_fields, device, gains)[0])
        row = {"tokenizer": tok.id, "spectrum_target": target, **metrics}
        print(json.dumps(row), flush=True)
        rows.append(row)
    domains = list(manifest["domains"])
    header = ["target"] + [f"{c} {d}" for d in domains for c in COLUMNS]
    print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        cells = [f"{row['spectrum_target']:g}"]
        for d in domains:
            cells += [f"{row.get(f'val/{d}/{c}', float('nan')):.3f} / {row.get(f'test/{d}/{c}', float('nan')):.3f}"
                      for c in COLUMNS]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
