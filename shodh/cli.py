"""One entry point, `shodh <verb>` (also `python -m shodh <verb>`).

Every verb takes `--profile NAME|FILE.yaml`, `--root DIR` and trailing dotted overrides
(`sim.grid=64`). User errors (bad config, bad data, unwritable workspace) print one line
and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path

import yaml

from shodh.config import RunConfig, available_profiles, load_config, validate_tree
from shodh.distributed import log_level_env
from shodh.errors import ShodhError
from shodh.workspace import SPLITS, ensure_root, readable_root

DEFAULT_ROOT = "./shodh-work"
log = logging.getLogger("shodh")


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="demo",
                        help=f"shipped profile ({', '.join(available_profiles())}) or a YAML file (default: demo)")
    parser.add_argument("--root", type=Path, default=Path(DEFAULT_ROOT), help=f"workspace directory (default: {DEFAULT_ROOT})")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. sim.grid=64")


def _trust_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load a checkpoint that has no shodh sha256 manifest (DeepSpeed unpickles its files: "
                             "only for checkpoints you wrote); same as train.trust_checkpoint=true")


def _launcher_args(parser: argparse.ArgumentParser) -> None:
    # The deepspeed launcher passes --local_rank=N; shodh.distributed checks it against LOCAL_RANK.
    parser.add_argument("--local-rank", "--local_rank", dest="local_rank", type=int, default=None, help=argparse.SUPPRESS)


def module_main(verb: str, argv: list[str] | None = None) -> int:
    """`python -m shodh.<module>` entries for launchers (deepspeed, srun, torchrun): the verb's
    CLI with the launcher's `--local_rank=N` (which it inserts right after the module) moved
    behind the verb, so the launched form and `shodh <verb>` are one implementation."""
    from shodh.distributed import strip_local_rank

    argv, local_rank = strip_local_rank(sys.argv[1:] if argv is None else argv)
    return main([verb, *([] if local_rank is None else [f"--local-rank={local_rank}"]), *argv])


def cmd_config(args, cfg: RunConfig) -> int:
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    return 0


def cmd_simulate(args, cfg: RunConfig) -> int:
    from shodh.physics import simulate

    root = ensure_root(args.root)
    manifest = simulate.run(cfg.sim, cfg.seed, root, overwrite=args.overwrite)
    counts = manifest["counts"]
    summary = ", ".join(f"{s}: " + "/".join(f"{d} {counts[s][d]['samples']}" for d in manifest["domains"])
                        for s in SPLITS)
    print(f"raw shards in {root / 'raw'} ({summary} frames); manifest {root / 'raw' / 'manifest.json'}")
    return 0


def cmd_import(args, cfg: RunConfig) -> int:
    from shodh.ingest.importer import ImportOptions, run_import

    if not args.paths:
        raise ShodhError("shodh import: give at least one PATH")
    opts = ImportOptions(format=args.format, paths=args.paths, domain=args.domain, field=args.field, split=args.split,
                         walls=args.walls, allow_open=args.allow_open, max_nonsolenoidal=args.max_nonsolenoidal,
                         project=args.project, resample=args.resample, dataset=args.dataset,
                         channels_last=args.channels_last, dt=args.dt, boundaries=args.boundaries, mask=args.mask)
    root = ensure_root(args.root)
    manifest = run_import(opts, root, cfg.tokenizer.operator)
    counts = manifest["counts"]
    summary = ", ".join(f"{s}: {counts[s].get(args.domain, {}).get('samples', 0)}" for s in SPLITS)
    print(f"imported {args.domain} into {root / 'raw'} ({summary} frames); domains now {', '.join(manifest['domains'])}")
    return 0


def cmd_pretrain(args, cfg: RunConfig) -> int:
    from shodh.distributed import dist_info
    from shodh.eval.callbacks import training_callbacks
    from shodh.train.trainer import pretrain

    root = ensure_root(args.root)
    run_dir = pretrain(cfg, root, args.run_name, dist_info(local_rank_arg=args.local_rank),
                       training_callbacks(cfg, root))
    print(f"run directory {run_dir}")
    return 0


def cmd_plan(args, cfg: RunConfig) -> int:
    from shodh.train.plan import Hardware, check_fits, make_plan, render

    given = {"memory_gib": args.device_memory_gib, "peak_flops": args.peak_flops or cfg.train.peak_flops or None,
             "efficiency": args.efficiency, "bandwidth": args.bandwidth, "loader_rate": args.loader_rate}
    hw = Hardware(gpu=args.device == "gpu", **{k: v for k, v in given.items() if v is not None})
    plan = make_plan(cfg, args.nodes, args.gpus_per_node, hw)
    print(render(plan, cfg, hw))
    check_fits(plan, hw, cfg)
    return 0


def cmd_train_tokenizer(args, cfg: RunConfig) -> int:
    from shodh.distributed import dist_info
    from shodh.tokenizer.train import train

    info = train(cfg, ensure_root(args.root), dist_info(local_rank_arg=args.local_rank))
    if info:
        val = ", ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in info["metrics"].items()
                        if k.startswith("val/") and k.endswith("/vrmse"))
        print(f"tokenizer {info['id']} in {args.root / 'tokenizer'} (val VRMSE: {val or 'n/a'}; "
              f"audit rel_max {info['audit']['rel_max']:.2e}, {info['audit']['operator']})")
    return 0


def cmd_audit(args, cfg: RunConfig) -> int:
    import json

    from shodh.tokenizer.audit import run_audit

    print(json.dumps(run_audit(cfg, readable_root(args.root), args.grid)))  # only reads: a read-only root will do
    return 0


def cmd_encode(args, cfg: RunConfig) -> int:
    from shodh.distributed import dist_info
    from shodh.tokenizer.encode import encode

    manifest = encode(cfg, ensure_root(args.root), dist_info(local_rank_arg=args.local_rank))
    if manifest:
        counts = manifest["counts"]
        summary = ", ".join(f"{s}: " + "/".join(f"{d} {counts[s][d]['samples']}" for d in manifest["domains"]) for s in counts)
        print(f"latents in {args.root / 'latents' / manifest['tokenizer_id']} ({summary} windows)")
    return 0


def cmd_evaluate(args, cfg: RunConfig) -> int:
    from shodh.eval.evaluate import evaluate

    summary = evaluate(cfg, ensure_root(args.root), args.run)
    m = summary["metrics"]
    split = summary["splits"][0]
    for domain in summary["samples"][split]:
        print(f"{split}/{domain}: latent_mse {m.get(f'{split}/{domain}/latent_mse', float('nan')):.4g}  "
              f"vrmse {m.get(f'{split}/{domain}/vrmse', float('nan')):.4g}  "
              f"(autoencoder floor {m.get(f'{split}/{domain}/ae_floor_vrmse', float('nan')):.4g})")
    print(f"summary and plots in {summary['run_dir']}/eval")
    return 0


def cmd_study(args, cfg: RunConfig) -> int:
    import shlex

    from shodh.study.arms import study_dir
    from shodh.study.report import nt_table
    from shodh.study.run import run_study

    if args.seeds is not None:
        cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, seeds=args.seeds))
    if args.arms:
        cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, arms=list(args.arms)))
    validate_tree(cfg)
    # The command as a user would retype it (without --arms/--seed-index/--report-only: the report adds them).
    command = shlex.join(["shodh", "study", "--profile", args.profile, "--root", str(args.root),
                          "--seeds", str(cfg.study.seeds), *args.overrides])
    study = run_study(cfg, ensure_root(args.root), args.seed_index, args.report_only, command)
    if study is None:
        print(f"study arm(s) done for seed index {args.seed_index}; assemble with --report-only")
        return 0
    for metric in ("vrmse", "latent_mse"):
        print(f"\nnegative transfer, {metric} ({study['split']} split, {study['seeds']} seed(s)):")
        print(nt_table(study, metric))
    print(f"\nstudy.md, study.json and plots in {study_dir(cfg, args.root)} ({study['wall_s']:.0f} s)")
    return 0


def cmd_reshard(args, cfg: RunConfig) -> int:
    from shodh.train.reshard import reshard_run

    dst, stats = reshard_run(args.run, args.world, args.ep_size, args.out, args.micro_batch, args.grad_accum,
                             args.keep_global_batch, cfg.train.trust_checkpoint)
    print(f"converted checkpoint {dst} ({stats['seconds']:.2f} s, peak RSS {stats['peak_rss_mib']:.0f} MiB, "
          f"{stats['rss_before_mib']:.0f} MiB before the conversion)")
    return 0


def cmd_ui(args, cfg: RunConfig) -> int:
    from shodh.ui import run_ui

    run_ui(cfg.tracking, readable_root(args.root), args.host, args.port)  # only reads: a read-only root will do
    return 1  # only reached when the server could not be started


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shodh", description=__doc__.splitlines()[0])
    parser.add_argument("--log-level", default=log_level_env())
    verbs = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = verbs.add_parser("config", help="print the resolved config of a profile plus overrides")
    _common(p)
    p.set_defaults(func=cmd_config)

    p = verbs.add_parser("simulate", help="run the flow solver and write raw field shards")
    _common(p)
    p.add_argument("--overwrite", action="store_true", help="replace raw data made by another config")
    p.set_defaults(func=cmd_simulate)

    p = verbs.add_parser("import", help="import velocity data (The Well's HDF5, npy / HDF5 arrays) as raw shards of a domain")
    p.add_argument("--format", choices=("well", "npy", "hdf5"), required=True,
                   help="well: The Well's HDF5 schema; npy / hdf5: one trajectory per file, [T, 3, X, Y, Z]")
    p.add_argument("--domain", required=True, help="the domain name in the workspace (data.weights keys name it)")
    p.add_argument("--field", default="velocity", help="Well: the vector field t1_fields/<FIELD> (default: velocity)")
    p.add_argument("--split", choices=("train", "val", "test", "auto"), default="auto",
                   help="auto: the file's own split (data/train|valid|test folders), else the last tenths are val/test")
    p.add_argument("--walls", choices=("mirror", "solid"), default="mirror",
                   help="WALL axes: mirror extension (tangential even, normal odd) or solid padding to the longest axis")
    p.add_argument("--allow-open", action="store_true", help="use OPEN axes as if periodic instead of refusing")
    p.add_argument("--max-nonsolenoidal", type=float, default=0.01,
                   help="refuse frames whose non-solenoidal part exceeds this fraction of the fluctuation rms (default 0.01)")
    p.add_argument("--project", action="store_true",
                   help="store the solenoidal part instead of refusing; records what was removed")
    p.add_argument("--resample", type=int, default=None, metavar="N", help="spectrally resample to N^3 (never done otherwise)")
    p.add_argument("--dataset", default="velocity", help="hdf5 arrays: the dataset holding [T, 3, X, Y, Z] (default: velocity)")
    p.add_argument("--channels-last", action="store_true", help="npy / hdf5 arrays are [T, X, Y, Z, 3]")
    p.add_argument("--dt", type=float, default=None, help="npy / hdf5 arrays: time between frames")
    p.add_argument("--boundaries", type=lambda text: text.split(","), default=["periodic"] * 3, metavar="BX,BY,BZ",
                   help="npy / hdf5 arrays: periodic|wall|open per axis (default periodic,periodic,periodic)")
    p.add_argument("--mask", type=Path, default=None, help="npy / hdf5 arrays: solid mask [X, Y, Z] as .npy of 0/1")
    _common(p)
    p.set_defaults(func=cmd_import)
    # Files and overrides share the positional arguments: an override has '=' (section.key=value).
    p.usage = "shodh import --format {well,npy,hdf5} PATH [PATH ...] --domain NAME [options] [section.key=value ...]"

    p = verbs.add_parser("pretrain", help="pretrain the MoE / dense latent transformer (also: deepspeed --module shodh.pretrain)")
    _common(p)
    p.add_argument("--run-name", default=None, help="run directory and MLflow run name (default: <profile>-<model.kind>)")
    _trust_arg(p)
    _launcher_args(p)
    p.set_defaults(func=cmd_pretrain)

    p = verbs.add_parser("plan", help="per-rank memory, FLOPs, all-to-all and loader needs of a pretraining layout; "
                                      "exits 2 when it does not fit")
    _common(p)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8, help="ranks per node, one per device (default: 8)")
    p.add_argument("--device", choices=("gpu", "cpu"), default="gpu", help="gpu: bf16, cpu: fp32 (default: gpu)")
    # Defaults (None) come from shodh.train.plan.Hardware, not imported here: it pulls in torch.
    p.add_argument("--device-memory-gib", type=float, default=None, help="usable memory per device (default: 80)")
    p.add_argument("--peak-flops", type=float, default=None,
                   help="dense matmul FLOP/s per device (default: train.peak_flops, else 989e12, H100 bf16)")
    p.add_argument("--efficiency", type=float, default=None, help="assumed fraction of peak reached (default: 0.4)")
    p.add_argument("--bandwidth", type=float, default=None, help="bytes/s per rank between ranks (default: 50e9)")
    p.add_argument("--loader-rate", type=float, default=None,
                   help="samples/s one loader worker delivers with a warm shard cache (default: the rate "
                        "benchmarks/bench_loader.py measured on a 2-core CPU, printed; measure your node's); "
                        "plans data.workers")
    p.set_defaults(func=cmd_plan)

    p = verbs.add_parser("train-tokenizer",
                         help="train the divergence-free tokenizer (also: deepspeed --module shodh.train_tokenizer)")
    _common(p)
    _launcher_args(p)
    p.set_defaults(func=cmd_train_tokenizer)

    p = verbs.add_parser("audit", help="float64 divergence audit of decoded fields; prints one JSON object")
    _common(p)
    p.add_argument("--grid", type=int, default=None, help="audit an N^3 decoder (default: the tokenizer's grid)")
    p.set_defaults(func=cmd_audit)

    p = verbs.add_parser("encode", help="encode raw shards into latent shards (also: deepspeed --module shodh.encode)")
    _common(p)
    _launcher_args(p)
    p.set_defaults(func=cmd_encode)

    p = verbs.add_parser("evaluate", help="evaluate a pretrained run per domain; metrics and plots into its MLflow run")
    _common(p)
    p.add_argument("--run", required=True, help="run directory (ROOT/runs/<experiment>/<name>) or run name")
    _trust_arg(p)
    p.set_defaults(func=cmd_evaluate)

    p = verbs.add_parser("study", help="negative-transfer study: MoE vs dense vs single-domain arms, router controls")
    _common(p)
    p.add_argument("--seeds", type=int, default=None, help="seeds per arm (study.seeds)")
    # One comma-separated value, so trailing overrides are never taken for arm names.
    p.add_argument("--arms", type=lambda text: [a for a in text.split(",") if a], default=None, metavar="ARM[,ARM...]",
                   help="arms to run/report, comma-separated (study.arms; default all)")
    p.add_argument("--seed-index", type=int, default=None,
                   help="run only this seed of the arms, no report (one SLURM array task)")
    p.add_argument("--report-only", action="store_true", help="assemble the report from finished runs")
    p.set_defaults(func=cmd_study)

    p = verbs.add_parser("reshard", help="convert a run's latest ZeRO-2/MoE checkpoint to another world size and ep_size")
    _common(p)
    p.add_argument("--run", required=True, type=Path, help="run directory (ROOT/runs/<experiment>/<name>)")
    p.add_argument("--world", required=True, type=int, help="number of ranks of the new layout")
    p.add_argument("--ep-size", required=True, type=int, help="expert-parallel size of the new layout")
    p.add_argument("--out", type=Path, default=None,
                   help="checkpoints directory to write into, `latest` naming the result (default: beside the source)")
    p.add_argument("--micro-batch", type=int, default=None, help="micro batch of the new layout (default: the checkpoint's)")
    batch = p.add_mutually_exclusive_group()
    batch.add_argument("--grad-accum", type=int, default=None, help="accumulation of the new layout (default: the checkpoint's)")
    batch.add_argument("--keep-global-batch", action="store_true",
                       help="derive the accumulation that keeps micro x accumulation x world unchanged")
    _trust_arg(p)
    p.set_defaults(func=cmd_reshard)

    p = verbs.add_parser("ui", help="MLflow UI over the workspace's tracking store")
    _common(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=5000, help="port (default: 5000)")
    p.set_defaults(func=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.verb == "import":
        # argparse takes one run of positionals; files and overrides may also follow the options.
        if any(a.startswith("-") for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
        args.paths = [Path(a) for a in args.overrides if "=" not in a]
        args.overrides = [a for a in args.overrides if "=" in a]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    overrides = [*args.overrides, *(["train.trust_checkpoint=true"] if getattr(args, "trust_checkpoint", False) else [])]
    try:
        cfg = load_config(args.profile, overrides)
        return args.func(args, cfg)
    except ShodhError as exc:
        print(f"shodh: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("shodh: interrupted", file=sys.stderr)
        return 130
