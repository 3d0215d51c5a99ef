#!/usr/bin/env python
"""The solver against analytic solutions and published numbers (the figures in the README).

    python benchmarks/physics_report.py [--root ./shodh-work] [--grids 32 64] [--threads 2]
                                        [--plot docs/figures/channel-law-of-the-wall.png]

Prints JSON and markdown tables:
- Taylor–Green decay (float64) and the stored velocity's divergence (float32);
- porous: Darcy linearity, and the permeability of the default packing at max_dt 0.1 vs
  0.0125 with the solid leak, at each grid (float32, the data's dtype);
- Stokes drag of simple cubic sphere arrays against Zick & Homsy (1982), Table 2, at four
  solid fractions and each grid (float64; normalization in `validation.sphere_array_drag`);
- channel, when --root names a workspace whose `shodh simulate` ran the channel: the settle
  phase's record (raw/spinup/channel.json: U_b+, wall stress, drift over the last H/u_tau) and
  the mean profile of the stored frames against the law of the wall and the bulk correlation,
  plotted to --plot. With no frames stored yet, the settle window's own mean profile is judged
  (the paper profile's check: `--channel-only --root <workspace of its spin-up>`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from shodh.fields.spectral import SpectralGrid
from shodh.io import iter_shard, read_json
from shodh.physics import domains, validation
from shodh.workspace import raw_dir, raw_manifest_path, spinup_paths

SOLID_FRACTIONS = (0.064, 0.125, 0.216, 0.343)


def timed(fn, *args, **kwargs) -> dict:
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    return out


def frames_profile(root: Path) -> dict | None:
    """u+ (y+) averaged over every stored channel frame of the workspace, with their U_b+; a
    workspace with the spin-up but no frames yet (the paper profile's channel check: the spin-up
    alone is the long part) is judged on the settle phase's own window mean ("frames": 0)."""
    spin = read_json(spinup_paths(root, "channel")[1], "spin-up record")
    base = {"settle": {k: v for k, v in spin["settle"].items() if k != "series"},
            "settle_series": spin["settle"]["series"], "coarse": spin["coarse"], "grid": spin["settle"]["grid"]}
    if not raw_manifest_path(root).exists():
        stats = {k: spin["settle"][k] for k in ("re_tau", "ub_plus", "profile")}
        return {**base, "frames": 0, "stats": stats, "check": validation.channel_against_references(stats)}
    manifest = read_json(raw_manifest_path(root), "raw manifest")
    records = [r for r in manifest["shards"] if r["domain"] == "channel"]
    if not records:
        return None
    sim = manifest["generator"]["sim"]
    cfg = domains.ChannelConfig(**sim["channel"])
    grid = SpectralGrid(manifest["grid"], dtype=torch.float64)
    geo = domains.channel_geometry(cfg, grid)
    profiles, bulks = [], []
    for record in records:
        for sample in iter_shard(raw_dir(root) / record["path"], record):
            u = torch.from_numpy(sample["u.npy"]).double()
            bulk, profile = validation.bulk_and_profile(u, geo, grid)
            profiles.append(profile / cfg.u_tau)
            bulks.append(bulk / cfg.u_tau)
    y, _ = domains.plane_profile(u, geo, grid)
    stats = {"re_tau": cfg.re_tau, "ub_plus": float(np.mean(bulks)),
             "profile": {"y_plus": (y * cfg.u_tau / geo["nu"]).tolist(), "u_plus": np.mean(profiles, axis=0).tolist()}}
    return {**base, "frames": len(bulks), "grid": grid.n, "stats": stats,
            "check": validation.channel_against_references(stats)}


def plot_channel(channel: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    stats, settle = channel["stats"], channel["settle_series"]
    y, u = np.array(stats["profile"]["y_plus"]), np.array(stats["profile"]["u_plus"])
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    yy = np.logspace(-0.5, np.log10(max(y.max(), 40)), 200)
    ax.plot(yy[yy < 12], yy[yy < 12], "k:", label="u+ = y+")
    ax.plot(yy[yy > 10], np.log(yy[yy > 10]) / 0.41 + 5.2, "k--", label="log law, κ = 0.41, B = 5.2")
    source = f"{channel['frames']} frames" if channel["frames"] else "settle window"
    ax.plot(y, u, "o-", color="C0", label=f"shodh {channel['grid']}³, {source}")
    ax.axvspan(30, 0.6 * stats["re_tau"], color="C2", alpha=0.12, label="checked band 30 ≤ y+ ≤ 0.6 Re_τ")
    ax.set_xscale("log")
    ax.set_xlabel("y+")
    ax.set_ylabel("u+")
    ax.set_title(f"mean profile, Re_τ = {stats['re_tau']:g}: U_b+ = {stats['ub_plus']:.2f} "
                 f"(correlation {channel['check']['ub_plus_correlation']:.2f})", fontsize=9)
    ax.legend(fontsize=8)
    t = np.array(settle["t"])
    bx.plot(t, settle["ub_plus"], color="C0", label="U_b+")
    bx.axhline(channel["check"]["ub_plus_correlation"], color="C0", ls="--", lw=0.8, label="U_b+ correlation")
    bx.set_xlabel(f"time on the {channel['grid']}³ grid (settle phase)")
    bx.set_ylabel("U_b+")
    tw = bx.twinx()
    tw.plot(t, settle["wall_stress_plus"], color="C3", lw=0.8, label="τ_w / u_τ² (per sample)")
    tw.axhline(1.0, color="C3", ls=":", lw=0.8)
    tw.set_ylim(0.5, 1.5)  # the first samples after the grid change can sit far above (clipped)
    tw.set_ylabel("τ_w / u_τ²")
    bx.axvspan(t[-1] - channel["settle"]["window"], t[-1], color="0.9", zorder=0)
    bx.set_title("settle phase; grey: the last H/u_τ, where stationarity is judged", fontsize=9)
    bx.legend(loc="upper left", fontsize=8)
    tw.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def print_tables(report: dict, grids: list[int]) -> None:
    print("\n| grid | permeability at max_dt 0.1 / 0.0125 | change | solid leak (rms \\|u\\| solid / fluid) |")
    print("|---|---|---|---|")
    for r in report["porous_dt_convergence"]:
        print(f"| {r['grid']}³ | {r['permeability'][0]:.6f} / {r['permeability'][1]:.6f} | {100 * r['rel_change']:.4f} % | "
              f"{r['solid_leak'][0]:.4f} / {r['solid_leak'][1]:.4f} |")
    print("\n| solid fraction c | Zick & Homsy K | " + " | ".join(f"K at {n}³ (error)" for n in grids) + " |")
    print("|---|---|" + "---|" * len(grids))
    for c in SOLID_FRACTIONS:
        rows = [r for r in report["sphere_arrays"] if r["solid_fraction"] == c]
        print(f"| {c} | {validation.ZICK_HOMSY_SC[c]} | " +
              " | ".join(f"{r['K']:.3f} ({100 * r['rel_error']:+.1f} %)" for r in rows) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=None, help="workspace whose channel frames to check")
    parser.add_argument("--grids", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("docs/figures/channel-law-of-the-wall.png"))
    parser.add_argument("--channel-only", action="store_true", help="only the --root workspace's channel check")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {} if args.channel_only else {
        "taylor_green_float64": timed(validation.taylor_green),
        "projection_float32": timed(validation.projection_divergence),
        "darcy_linearity_float64": timed(validation.darcy),
        "porous_dt_convergence": [timed(validation.porous_dt_convergence, n) for n in args.grids],
        "sphere_arrays": [timed(validation.sphere_array_drag, n, c) for c in SOLID_FRACTIONS for n in args.grids],
    }
    if args.root is not None and spinup_paths(args.root, "channel")[1].exists():
        report["channel"] = frames_profile(args.root)
        if report["channel"] is not None:
            plot_channel(report["channel"], args.plot)
            report["channel"]["plot"] = str(args.plot)
    print(json.dumps(report, indent=1))
    if not args.channel_only:
        print_tables(report, args.grids)
    channel = report.get("channel")
    if channel:
        check, settle = channel["check"], channel["settle"]
        source = f"{channel['frames']} frames" if channel["frames"] else "settle window mean, no frames stored"
        print(f"\nchannel {channel['grid']}³, {source}: U_b+ = {check['ub_plus']:.2f} vs "
              f"{check['ub_plus_correlation']:.2f} ({100 * check['ub_rel_error']:+.1f} %); settle window "
              f"{settle['window']:.1f}: U_b+ {settle['ub_plus']:.2f}, drift {100 * settle['ub_drift']:+.2f} %, "
              f"wall stress {settle['wall_stress_plus']:.3f} u_tau^2")
        print(f"| y+ | u+ ({'frames' if channel['frames'] else 'settle window'}) | log law | error |")
        print("|---|---|---|---|")
        y, u = channel["stats"]["profile"]["y_plus"], channel["stats"]["profile"]["u_plus"]
        law = validation.law_of_the_wall(np.array(y))
        for yi, ui, li in zip(y, u, law):
            print(f"| {yi:.1f} | {ui:.2f} | {'' if np.isnan(li) else f'{li:.2f}'} | "
                  f"{'' if np.isnan(li) else f'{100 * (ui / li - 1):+.1f} %'} |")


if __name__ == "__main__":
    main()
