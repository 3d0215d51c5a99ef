"""Assembling the study from finished child runs: study.json, study.md, plots, the printed table.

Everything here is read back from the runs (each child's eval/summary.json per-sample errors and
its study_arm.json gradient probes), never from memory, so `--report-only` after a SLURM array
gives the same report as a sequential run. Shape legend (the project's): R seeds, I test samples, E experts.
"""

from __future__ import annotations

import dataclasses
import math
import re
import shlex
from pathlib import Path

import numpy as np

from shodh.config import RunConfig
from shodh.errors import ShodhError
from shodh.io import read_json, write_json_atomic, write_text_atomic
from shodh.study import stats
from shodh.study.arms import Arm, arm_config, child_dir, study_name
from shodh.tracking import Tracker
from shodh.workspace import STUDY_DONE

METRICS = ("vrmse", "latent_mse")  # E_d: decoded VRMSE first (the headline), latent MSE beside it
ROUTE = re.compile(r"route/(?P<domain>[^/]+)/layer(?P<layer>\d+)/expert(?P<expert>\d+)$")


def _load(cfg: RunConfig, root: Path, arm: Arm, seed_index: int) -> tuple[dict, dict]:
    run_dir = child_dir(cfg, root, arm.name, seed_index)
    if not (run_dir / STUDY_DONE).is_file():
        raise ShodhError(f"{run_dir}: arm {arm.name} seed {seed_index} has not finished (no {STUDY_DONE}); run "
                         f"`shodh study ... --arms {arm.name} --seed-index {seed_index}` first")
    return read_json(run_dir / "eval" / "summary.json", "evaluation summary"), read_json(run_dir / STUDY_DONE, "study arm")


def _errors_RI(summaries: list[dict], split: str, domain: str, metric: str, where: str) -> tuple[np.ndarray, list[str]]:
    rows, ids = [], None
    for s in summaries:
        entry = s.get("per_sample", {}).get(split, {}).get(domain)
        if entry is None:
            raise ShodhError(f"{s['run_dir']}/eval/summary.json: no per-sample {split} errors for '{domain}' "
                             f"(evaluated with an older shodh? re-run `shodh evaluate`)")
        if ids is not None and entry["ids"] != ids:
            raise ShodhError(f"{where}: seeds were evaluated on different {split} samples; pairing needs the same")
        ids = entry["ids"]
        rows.append(entry[metric])
    return np.asarray(rows, dtype=np.float64), ids


def _routing(summaries: list[dict]) -> dict:
    """Per layer: P(expert | domain) of the first seed, and the normalized MI, mean over seeds and per seed.

    The table is one seed's, not a mean: which expert a domain settles on is arbitrary and differs between
    seeds, so a mean of the tables blurs a separation every seed has (NMI 0.88 with a near-uniform mean table
    was seen); NMI does not depend on the experts' numbering, so it is averaged."""
    tables: dict[int, dict[str, list[list[float]]]] = {}
    nmi: dict[int, list[float]] = {}
    for s in summaries:
        per: dict[tuple[int, str], dict[int, float]] = {}
        for key, value in s["metrics"].items():
            m = ROUTE.match(key)
            if m:
                per.setdefault((int(m["layer"]), m["domain"]), {})[int(m["expert"])] = value
            elif key.startswith("route/layer") and key.endswith("/domain_mi"):
                nmi.setdefault(int(key.split("/")[1][len("layer"):]), []).append(value)
        for (layer, domain), experts in per.items():
            tables.setdefault(layer, {}).setdefault(domain, []).append([experts[e] for e in sorted(experts)])
    return {f"layer{l}": {"p_expert_given_domain": {d: v[0] for d, v in sorted(tables[l].items())},
                          "nmi": float(np.mean(nmi[l])) if l in nmi else math.nan,
                          "nmi_per_seed": nmi.get(l, [])}
            for l in sorted(tables)}


def _conflict(records: list[dict]) -> list[dict]:
    """Mean over seeds of each conflict statistic at each checkpoint step."""
    steps = sorted({p["step"] for r in records for p in r["conflict"]})
    out = []
    for step in steps:
        points = [p["groups"] for r in records for p in r["conflict"] if p["step"] == step]
        groups = {g: {k: _nanmean([pt[g][k] for pt in points if g in pt]) for k in points[0][g]} for g in points[0]}
        out.append({"step": step, "seeds": len(points), "groups": groups})
    return out


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if v is not None and not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def assemble(cfg: RunConfig, root: Path, arms: list[Arm], domains: list[str], tokenizer_id: str, command: str) -> dict:
    """study.json's content from the finished child runs of `arms` x every seed."""
    split, seeds = cfg.study.split, range(cfg.study.seeds)
    loaded = {a.name: [_load(cfg, root, a, i) for i in seeds] for a in arms}
    errors, per_sample, n_samples, trajectories = {}, {}, {}, {}
    for a in arms:
        summaries = [s for s, _ in loaded[a.name]]
        errors[a.name], per_sample[a.name] = {}, {}
        for d in domains:
            errors[a.name][d] = {}
            per_sample[a.name][d] = {}
            for metric in METRICS:
                e_RI, ids = _errors_RI(summaries, split, d, metric, a.name)
                per_sample[a.name][d][metric] = (e_RI, ids)
                errors[a.name][d][metric] = float(e_RI.mean())
                n_samples[d] = len(ids)
    names = {a.name for a in arms}
    nt: dict = {metric: {} for metric in METRICS}
    for a in arms:
        if a.domain is not None:
            continue
        for d in domains:
            ref = a.reference(d)
            if ref not in names:
                continue
            for metric in METRICS:
                (e_arm, ids_arm), (e_ref, ids_ref) = per_sample[a.name][d][metric], per_sample[ref][d][metric]
                if ids_arm != ids_ref:
                    raise ShodhError(f"{a.name} vs {ref}: evaluated on different {split} samples of '{d}'")
                clusters = np.asarray([stats.trajectory_of(i) for i in ids_arm])
                lo, hi = stats.paired_bootstrap_ci(e_arm, e_ref, cfg.study.bootstrap, cfg.study.level, cluster_I=clusters)
                frame_lo, frame_hi = stats.paired_bootstrap_ci(e_arm, e_ref, cfg.study.bootstrap, cfg.study.level)
                nt[metric].setdefault(a.name, {})[d] = {"reference": ref, "nt": stats.negative_transfer(e_arm, e_ref),
                                                        "lo": lo, "hi": hi, "frame_lo": frame_lo, "frame_hi": frame_hi}
                trajectories[d] = len(set(clusters.tolist()))
    base = arm_config(cfg, arms[0], domains, 0)
    budget = {"steps": base.train.max_steps, "mixed_micro_batch": cfg.train.micro_batch,
              "grad_accum": cfg.train.grad_accum, "tokens_per_sample": cfg.model.tokens,
              "samples_per_domain": {d: cfg.train.max_steps * cfg.train.grad_accum * arm_config(
                  cfg, Arm("single", "moe", domain=d), domains, 0).train.micro_batch for d in domains}}
    return {
        "study": study_name(cfg), "profile": cfg.profile, "tokenizer_id": tokenizer_id, "split": split,
        "seeds": cfg.study.seeds, "base_seed": cfg.seed, "domains": domains, "arms": [a.name for a in arms],
        "references": {a.name: {d: a.reference(d) for d in domains} for a in arms if a.domain is None},
        "test_samples": n_samples, "test_trajectories": trajectories, "bootstrap": cfg.study.bootstrap, "level": cfg.study.level,
        "budget": budget, "model": dataclasses.asdict(cfg.model), "commands": commands(cfg, command, arms),
        "errors": errors, "negative_transfer": nt,
        "conflict": {a.name: _conflict([r for _, r in loaded[a.name]]) for a in arms},
        "routing": {a.name: _routing([s for s, _ in loaded[a.name]]) for a in arms if a.kind == "moe"},
        "arm_wall_s": {a.name: [r["wall_s"] for _, r in loaded[a.name]] for a in arms},
    }


def commands(cfg: RunConfig, command: str, arms: list[Arm]) -> dict:
    """The command that made the study (`command` lacks --arms) and its equivalent as separate
    launches: one per arm x seed (e.g. SLURM array tasks), then the report."""
    base = command or f"shodh study --profile {shlex.quote(cfg.profile)} --seeds {cfg.study.seeds}"
    study = base + (" --arms " + ",".join(cfg.study.arms) if cfg.study.arms else "")
    return {"study": study,
            "array_task": f"{base} --arms ARM --seed-index I   # ARM in {', '.join(a.name for a in arms)}; "
                          f"I in 0..{cfg.study.seeds - 1}",
            "report": f"{study} --report-only"}


def fmt_nt(entry: dict | None) -> str:
    if entry is None:
        return "n/a"
    return f"{entry['nt']:+.3f} [{entry['lo']:+.3f}, {entry['hi']:+.3f}]"


def nt_table(study: dict, metric: str) -> str:
    """Markdown table: one row per mixed arm, NT_d [CI] per domain."""
    domains = study["domains"]
    lines = ["| arm | reference | " + " | ".join(f"NT {d} [{study['level']:.0%} CI]" for d in domains) + " |",
             "|---|---|" + "---|" * len(domains)]
    for arm, per in study["negative_transfer"][metric].items():
        refs = ", ".join(sorted({per[d]["reference"] for d in per}))
        lines.append(f"| {arm} | {refs} | " + " | ".join(fmt_nt(per.get(d)) for d in domains) + " |")
    return "\n".join(lines)


def _frame_table(study: dict) -> str:
    lines = ["| arm | domain | clustered CI (trajectories) | frame-level CI |", "|---|---|---|---|"]
    for arm, per in study["negative_transfer"]["vrmse"].items():
        for d, e in per.items():
            lines.append(f"| {arm} | {d} | [{e['lo']:+.3f}, {e['hi']:+.3f}] | [{e['frame_lo']:+.3f}, {e['frame_hi']:+.3f}] |")
    return "\n".join(lines)


def _error_table(study: dict) -> str:
    domains = study["domains"]
    lines = ["| arm | " + " | ".join(f"{d} {m}" for d in domains for m in METRICS) + " |",
             "|---|" + "---|" * (len(domains) * len(METRICS))]
    for arm, per in study["errors"].items():
        lines.append(f"| {arm} | " + " | ".join(f"{per[d][m]:.4g}" for d in domains for m in METRICS) + " |")
    return "\n".join(lines)


def _conflict_table(study: dict) -> str:
    lines = ["| arm | step | normalized cos | cross cos | conflict rate P(cos<0) | " +
             " | ".join(f"same-domain cos {d}" for d in study["domains"]) + " |",
             "|---|---|---|---|---|" + "---|" * len(study["domains"])]
    for arm, points in study["conflict"].items():
        for p in points:
            g = p["groups"]["shared"]
            lines.append(f"| {arm} | {p['step']} | {g['normalized']:.3f} | {g['cross']:.3f} | {g['conflict_rate']:.2f} | "
                         + " | ".join(f"{g.get(f'same_{d}', math.nan):.3f}" for d in study["domains"]) + " |")
    return "\n".join(lines)


def _routing_table(study: dict) -> str:
    domains = study["domains"]
    lines = ["| arm | layer | NMI(domain; expert), mean (per seed) | "
             + " | ".join(f"P(expert \\| {d}), first seed" for d in domains) + " |",
             "|---|---|---|" + "---|" * len(domains)]
    for arm, layers in study["routing"].items():
        for layer, r in layers.items():
            probs = [" ".join(f"{p:.2f}" for p in r["p_expert_given_domain"].get(d, [])) for d in domains]
            seeds = ", ".join(f"{v:.2f}" for v in r.get("nmi_per_seed", []))
            lines.append(f"| {arm} | {layer} | {r['nmi']:.3f} ({seeds}) | " + " | ".join(probs) + " |")
    return "\n".join(lines)


def _verdicts(study: dict) -> list[str]:
    out = []
    for arm, per in study["negative_transfer"]["vrmse"].items():
        for d, e in per.items():
            if e["lo"] > 0:
                word = "negative transfer (worse than its single-domain reference; interval above 0)"
            elif e["hi"] < 0:
                word = "positive transfer (better than its single-domain reference; interval below 0)"
            else:
                word = "no detectable transfer either way (interval contains 0)"
            size = " Its size is below 1% of the error, negligible in practice." if abs(e["nt"]) < 0.01 else ""
            out.append(f"- {arm} on {d}: NT {e['nt']:+.3f} vs {e['reference']}: {word}.{size}")
    return out


def markdown(study: dict) -> str:
    b = study["budget"]
    samples = ", ".join(f"{d}: {n}" for d, n in b["samples_per_domain"].items())
    tested = ", ".join(f"{d}: {n}" for d, n in study["test_samples"].items())
    c = study["commands"]
    return "\n".join([
        f"# Negative-transfer study `{study['study']}`", "",
        f"Profile `{study['profile']}`, tokenizer `{study['tokenizer_id']}`, {study['seeds']} seed(s) "
        f"(seed {study['base_seed']} + i), errors on the `{study['split']}` split ({tested} frame pairs per domain), "
        f"{b['steps']} optimizer steps per arm, mixed micro batch {b['mixed_micro_batch']} x grad_accum "
        f"{b['grad_accum']}; every arm sees the same number of each domain's samples ({samples}, x "
        f"{b['tokens_per_sample']} tokens; mixed arms in expectation); single-domain arms run the same steps "
        f"with the micro batch scaled by the domain's share, under the same lr schedule.", "",
        "## Commands", "", "```", c["study"], "```", "",
        "As separate launches (e.g. one SLURM array task each), then the report:", "", "```", c["array_task"],
        c["report"], "```", "",
        "## Negative transfer, decoded VRMSE", "",
        "NT_d(arm) = E_d(arm) / E_d(reference) − 1; positive = the mixed arm is worse than the single-domain "
        f"arm of its family. Paired clustered bootstrap ({study['bootstrap']} replicates: seeds, then test "
        f"trajectories, then frames within each drawn trajectory).", "",
        nt_table(study, "vrmse"), "",
        "## Clustered vs frame-level intervals, decoded VRMSE", "",
        "The same intervals with frames resampled as if independent (the earlier default), for comparison: "
        "frames of one trajectory are correlated, so those are narrower than the data supports.", "",
        _frame_table(study), "",
        "## Negative transfer, latent MSE", "", nt_table(study, "latent_mse"), "",
        "## Errors (mean over seeds and test samples)", "", _error_table(study), "",
        "## Gradient conflict on shared parameters", "",
        "Cosine of per-domain gradients of the training loss on held-out val batches at each checkpoint "
        "(mean over seeds); normalized = cross-domain cosine / geometric mean of the same-domain cosines of "
        "independent batches (1 = as aligned as one domain with itself). Shared = every parameter but the "
        "routed experts (attention, embeddings, router, shared expert, norms, head; all FFNs in dense "
        "models); per-group values are in study.json.", "",
        _conflict_table(study), "",
        "## Routing (evaluation, MoE arms)", "", _routing_table(study), "",
        "## What these numbers do and do not show", "",
        *_verdicts(study), "",
        f"- Scale: {b['steps']} steps, model width {study['model']['dim']}, depth {study['model']['depth']}, "
        f"{study['model']['num_experts']} experts; {study['seeds']} seed(s). The intervals cover seed and "
        f"test-trajectory variation at this budget only" + (" (one seed: test-trajectory variation only)"
                                                             if study["seeds"] == 1 else "") + ". "
        f"Test trajectories per domain: {', '.join(f'{d}: {n}' for d, n in study['test_trajectories'].items())}"
        + ("; with fewer than 4 a domain's interval says little about other trajectories (geometries, flows)."
           if min(study["test_trajectories"].values(), default=0) < 4 else "."),
        "- They say nothing about other budgets, model sizes, data sizes, tokenizers or domains; "
        "a short budget mostly measures early-training speed, not converged transfer.",
        "- dense_total_mixed is compared with dense_single_<d> (active width), so its NT also contains the "
        "gain of its larger FFN; the capacity-matched comparisons are moe_mixed vs moe_single_<d> and "
        "dense_active_mixed vs dense_single_<d>.",
        "- moe_random (fixed position hash) and moe_oracle (domain label -> expert block; the only arm in "
        "which a domain label reaches the model, and only its router) bracket the learned router.",
        "- Mixed arms draw each sample's domain at random with the configured weights: their per-domain "
        "sample count equals the single-domain arms' in expectation, not exactly.", "",
    ])


def nt_bars(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    domains = study["domains"]
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 3.5), squeeze=False)
    for ax, metric in zip(axes[0], METRICS):
        arms = list(study["negative_transfer"][metric])
        width = 0.8 / max(1, len(domains))
        for k, d in enumerate(domains):
            vals = [study["negative_transfer"][metric][a].get(d) for a in arms]
            x = [i + k * width for i in range(len(arms))]
            y = [v["nt"] if v else math.nan for v in vals]
            err = [[v["nt"] - v["lo"] if v else 0 for v in vals], [v["hi"] - v["nt"] if v else 0 for v in vals]]
            ax.bar(x, y, width, yerr=err, capsize=3, label=d)
        ax.axhline(0, color="k", lw=0.8)
        ax.set_xticks([i + width * (len(domains) - 1) / 2 for i in range(len(arms))], arms, rotation=30, ha="right")
        ax.set_ylabel(f"NT ({metric})")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def conflict_plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for arm, points in study["conflict"].items():
        steps = [p["step"] for p in points]
        axes[0].plot(steps, [p["groups"]["shared"]["normalized"] for p in points], marker="o", label=arm)
        axes[1].plot(steps, [p["groups"]["shared"]["conflict_rate"] for p in points], marker="o", label=arm)
    axes[0].set_ylabel("normalized cross-domain cosine")
    axes[1].set_ylabel("conflict rate P(cos < 0)")
    for ax in axes:
        ax.set_xlabel("step")
        ax.axhline(0, color="k", lw=0.8)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def routing_plot(study: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = [arm for arm, layers in study["routing"].items() if layers]
    if not arms:
        return
    layers = list(dict.fromkeys(layer for arm in arms for layer in study["routing"][arm]))
    # One row per arm, one column per MoE layer: the arms' heatmaps side by side, readable at any arm count.
    fig, axes = plt.subplots(len(arms), len(layers), figsize=(2.8 * len(layers) + 1.2, 1.4 * len(arms) + 0.8),
                             squeeze=False)
    for i, (row, arm) in enumerate(zip(axes, arms)):
        for ax, layer in zip(row, layers):
            r = study["routing"][arm].get(layer)
            if r is None:
                ax.axis("off")
                continue
            domains = list(r["p_expert_given_domain"])
            im = ax.imshow(np.asarray([r["p_expert_given_domain"][d] for d in domains]), vmin=0, vmax=1,
                           cmap="viridis", aspect="auto")
            ax.set_title(f"{arm}, {layer}: NMI {r['nmi']:.2f} (mean)", fontsize=7)
            ax.set_yticks(range(len(domains)), domains, fontsize=7)
            ax.set_xticks(range(len(r["p_expert_given_domain"][domains[0]])))
            ax.tick_params(labelsize=7, labelbottom=i == len(arms) - 1)
    for ax in axes[-1]:
        ax.set_xlabel("expert", fontsize=7)
    fig.subplots_adjust(hspace=0.5, wspace=0.35)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="P(expert | domain), first seed")
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(study: dict, folder: Path, parent: Tracker) -> None:
    """study.json, study.md and plots/ into the study folder, all logged to the parent run."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plots").mkdir(exist_ok=True)
    write_json_atomic(folder / "study.json", study)
    write_text_atomic(folder / "study.md", markdown(study))
    plots = [folder / "plots" / "nt.png", folder / "plots" / "conflict.png", folder / "plots" / "routing.png"]
    nt_bars(study, plots[0])
    conflict_plot(study, plots[1])
    routing_plot(study, plots[2])
    metrics = {f"nt/{metric}/{arm}/{d}/{k}": e[k] for metric, per_arm in study["negative_transfer"].items()
               for arm, per in per_arm.items() for d, e in per.items() for k in ("nt", "lo", "hi")}
    try:
        parent.log_metrics(metrics, 0)
        for path in [folder / "study.md", folder / "study.json", *[p for p in plots if p.is_file()]]:
            parent.log_artifact(path, "study")
    finally:
        parent.close()
