"""A trained tokenizer's reconstruction metrics on any split of its workspace, the train split
included (train-tokenizer itself evaluates val and test only): train close to val means the
network underfits, train far below val means it overfits.

    .venv/bin/python benchmarks/tokenizer_split.py --root ROOT [--split train] [--max-fields 16]

Prints one JSON object: the tokenizer id and `tokenizer.train.evaluate`'s metrics.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from shodh.distributed import choose_device, dist_info
from shodh.tokenizer import load_tokenizer
from shodh.tokenizer.data import load_raw_manifest
from shodh.tokenizer.train import evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="workspace with raw/ and tokenizer/")
    parser.add_argument("--split", default="train", choices=("train", "val", "test"))
    parser.add_argument("--max-fields", type=int, default=16, help="fields per domain; 0 = all")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = choose_device(args.device, dist_info())
    tokenizer = load_tokenizer(args.root, device)
    metrics, _ = evaluate(tokenizer.net, tokenizer.norm, load_raw_manifest(args.root), args.root, args.split,
                          args.max_fields, device, tokenizer.gains)
    print(json.dumps({"tokenizer": tokenizer.id, "split": args.split, **metrics}))


if __name__ == "__main__":
    main()
