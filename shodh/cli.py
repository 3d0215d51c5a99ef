"""One entry point, `shodh <verb>` (also `python -m shodh <verb>`).

Every verb takes `--profile NAME|FILE.yaml`, `--root DIR` and trailing dotted overrides
(`sim.grid=64`). User errors (bad config, bad data, unwritable workspace) print one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import tempfile
from pathlib import Path

import yaml

from shodh.config import RunConfig, available_profiles, load_config
from shodh.errors import ShodhError

DEFAULT_ROOT = "./shodh-work"
log = logging.getLogger("shodh")


def ensure_root(root: Path) -> Path:
    """Create the workspace if needed and prove it is writable, before any work starts."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=root, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise ShodhError(f"--root {root}: workspace is not writable ({exc.strerror or exc})") from None
    return root


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="demo",
                        help=f"shipped profile ({', '.join(available_profiles())}) or a YAML file (default: demo)")
    parser.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT), help=f"workspace directory (default: {DEFAULT_ROOT})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. sim.grid=64")


def cmd_config(args, cfg: RunConfig) -> int:
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def cmd_simulate(args, cfg: RunConfig) -> int:
    from shodh.physics import simulate

    root = ensure_root(args.root)
    manifest = simulate.run(cfg.sim, cfg.seed, root, overwrite=args.overwrite)
    counts = manifest["counts"]
    summary = ", ".join(f"{s}: " + "/".join(f"{d} {counts[s][d]['samples']}" for d in manifest["domains"])
                        for s in simulate.SPLITS)
    print(f"raw shards in {root / 'raw'} ({summary} frames); manifest {root / 'raw' / 'manifest.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shodh", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=os.environ.get("SHODH_LOG_LEVEL", "INFO"))
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("config", help="print the resolved config of a profile plus overrides")
    _common(p)
    p.set_defaults(func=cmd_config)

    p = verbs.add_parser("simulate", help="run the flow solver and write raw field shards")
    _common(p)
    p.add_argument("--overwrite", action="store_true", help="replace raw data made by another config")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.profile, args.overrides)
        return args.func(args, cfg)
    except ShodhError as exc:
        print(f"shodh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shodh: interrupted", file=sys.stderr)
        return 130
