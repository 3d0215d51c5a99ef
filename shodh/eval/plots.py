"""Evaluation figures (PNG, matplotlib Agg): training curves, rollouts, spectra, mid-plane slices.

Each function takes plain arrays, writes one file and returns its path. The routing heatmap is
drawn here for both evaluation and pretraining (through shodh.eval.callbacks), so both draw it alike.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from shodh.errors import DataError  # noqa: E402

COMPONENTS = ("u_x", "u_y", "u_z")


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _series(metrics_jsonl: Path, names: list[str]) -> dict[str, list[tuple[int, float]]]:
    """(step, value) points of the named metrics in metrics.jsonl, the last value per step (evaluate
    logs the final step again), sorted by step."""
    series: dict[str, dict[int, float]] = {}
    if metrics_jsonl.is_file():
        for n, line in enumerate(metrics_jsonl.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError:
                raise DataError(f"{metrics_jsonl}: line {n} is not JSON") from None
            for name in names:
                if row.get(name) is not None:
                    series.setdefault(name, {})[int(row["step"])] = float(row[name])
    return {name: sorted(points.items()) for name, points in series.items()}


def mse_curves(metrics_jsonl: Path, domains: list[str], path: Path) -> Path:
    """train/loss and val/<domain>/latent_mse against the training step, from metrics.jsonl."""
    names = ["train/loss"] + [f"val/{d}/latent_mse" for d in domains]
    series = _series(metrics_jsonl, names)
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        if name in series:
            ax.plot(*zip(*series[name]), marker="o" if name != "train/loss" else None, ms=3, label=name)
    ax.set_xlabel("training step")
    ax.set_ylabel("latent MSE (normalized)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("one-step latent MSE")
    return _save(fig, path)


def vrmse_curves(metrics_jsonl: Path, domains: list[str], path: Path) -> Path:
    """val/<domain>/vrmse (the prediction decoded) and the autoencoder floor against the training step."""
    names = [f"val/{d}/{m}" for d in domains for m in ("vrmse", "ae_floor_vrmse")]
    series = _series(metrics_jsonl, names)
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, d in enumerate(domains):
        color = f"C{i}"
        if f"val/{d}/vrmse" in series:
            ax.plot(*zip(*series[f"val/{d}/vrmse"]), marker="o", ms=3, color=color, label=f"{d}: one-step prediction")
        if f"val/{d}/ae_floor_vrmse" in series:
            ax.plot(*zip(*series[f"val/{d}/ae_floor_vrmse"]), ls="--", color=color, label=f"{d}: autoencoder floor")
    ax.set_xlabel("training step")
    ax.set_ylabel("decoded VRMSE (val)")
    ax.legend(fontsize=8)
    ax.set_title("decoded one-step VRMSE per domain")
    return _save(fig, path)


def routing_nmi(metrics_jsonl: Path, layers: list[int], path: Path) -> Path:
    """route/layer<l>/domain_mi (NMI of domain and expert) and route/layer<l>/purity against the step."""
    names = [f"route/layer{l}/{m}" for l in layers for m in ("domain_mi", "purity")]
    series = _series(metrics_jsonl, names)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, metric, label in ((axes[0], "domain_mi", "NMI(domain; expert)"), (axes[1], "purity", "expert purity")):
        for l in layers:
            name = f"route/layer{l}/{metric}"
            if name in series:
                ax.plot(*zip(*series[name]), marker="o", ms=2, label=f"layer {l}")
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.suptitle("does routing separate the domains?")
    fig.tight_layout()
    return _save(fig, path)


def rollout_curves(rollout: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """Per domain: latent MSE and decoded VRMSE against the autoregressive step k."""
    fig, (ax_l, ax_v) = plt.subplots(1, 2, figsize=(9, 3.5))
    for domain, (latent_k, vrmse_k) in rollout.items():
        k = np.arange(1, len(latent_k) + 1)
        ax_l.plot(k, latent_k, marker="o", label=domain)
        ax_v.plot(k, vrmse_k, marker="o", label=domain)
    ax_l.set(xlabel="rollout step k", ylabel="latent MSE", title="rollout, latent space")
    ax_v.set(xlabel="rollout step k", ylabel="VRMSE", title="rollout, decoded field")
    ax_v.axhline(1.0, color="grey", lw=0.8, ls="--")  # VRMSE 1 = no better than the spatial mean
    for ax in (ax_l, ax_v):
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def spectra(spectra_by_domain: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, cutoff: int | None = None,
            label: str = "prediction") -> Path:
    """Per domain: shell energy spectrum E(k) of the truth and of a prediction (or decoded field);
    `cutoff` marks the data's band limit."""
    domains = list(spectra_by_domain)
    fig, axes = plt.subplots(1, max(1, len(domains)), figsize=(4.5 * max(1, len(domains)), 3.5), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        true_S, pred_S = spectra_by_domain[domain]
        k = np.arange(1, len(true_S))  # shell 0 is the mean flow: not on a log axis
        ax.loglog(k, true_S[1:], label="truth")
        ax.loglog(k, pred_S[1:], ls="--", label=label)
        if cutoff:
            ax.axvline(cutoff, color="grey", lw=0.8, ls=":", label=f"band limit k = {cutoff}")
        ax.set(xlabel="wavenumber |k|", ylabel="E(k)", title=domain)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def shell_vrmse(errors_by_domain: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, edges: tuple[float, float],
                cutoff: int | None = None) -> Path:
    """VRMSE per shell, sqrt(E_err(k) / E_true(k)), from the mean spectra (E_true, E_error) per
    domain; the low / mid / high band edges shaded, `cutoff` marked."""
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for domain, (true_S, err_S) in errors_by_domain.items():
        k = np.arange(1, len(true_S))
        last = min(len(true_S) - 1, cutoff or len(true_S) - 1)
        ax.semilogx(k[:last], np.sqrt(err_S[1 : last + 1] / np.maximum(true_S[1 : last + 1], 1e-300)), label=domain)
    for edge in edges:
        ax.axvline(edge, color="0.7", lw=0.8)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")  # error as large as the signal at that scale
    ax.set(xlabel="wavenumber |k| (grey: low / mid / high band edges)", ylabel="VRMSE of the shell",
           title="reconstruction error per scale", ylim=(0, None))
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


PLANES = {"xy": ("x", "y", "z"), "xz": ("x", "z", "y")}  # plane: (horizontal axis, vertical axis, cut axis)


def slices(slices_by_domain: dict, path: Path, component: int = 0, plane: str = "xy", masks: dict | None = None,
           label: str = "prediction") -> Path:
    """Per domain (rows): the mid-plane of one velocity component in `plane` ("xy": z = N/2,
    "xz": y = N/2), truth / prediction / error, with the solid outline where `masks` has one."""
    domains = list(slices_by_domain)
    h_axis, v_axis, cut_axis = PLANES[plane]
    fig, axes = plt.subplots(max(1, len(domains)), 3, figsize=(10, 3.2 * max(1, len(domains))), squeeze=False)
    for row, domain in zip(axes, domains):
        true_CXYZ, pred_CXYZ = (np.asarray(a) for a in slices_by_domain[domain])
        cut = "xyz".index(cut_axis)
        mid = true_CXYZ.shape[-1] // 2
        true_HV, pred_HV = (np.take(a[component], mid, axis=cut) for a in (true_CXYZ, pred_CXYZ))
        mask_HV = np.take(np.asarray(masks[domain]), mid, axis=cut) if masks and domain in masks else None
        lo, hi = float(true_HV.min()), float(true_HV.max())
        err = np.abs(pred_HV - true_HV).max() or 1.0
        for ax, image, title, kw in (
            (row[0], true_HV, "truth", dict(vmin=lo, vmax=hi, cmap="viridis")),
            (row[1], pred_HV, label, dict(vmin=lo, vmax=hi, cmap="viridis")),
            (row[2], pred_HV - true_HV, "error", dict(vmin=-err, vmax=err, cmap="RdBu_r")),
        ):
            im = ax.imshow(image.T, origin="lower", **kw)  # first axis right, second up
            if mask_HV is not None and 0 < mask_HV.mean() < 1:
                ax.contour(mask_HV.T, levels=[0.5], colors="k", linewidths=0.5)
            ax.set_title(f"{domain}: {COMPONENTS[component]} {title} ({h_axis}-{v_axis}, {cut_axis}=N/2)", fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, path)


def routing_heatmap(counts_KLE, domains: list[str], layers: list[int], path: Path) -> Path:
    """Domain x expert fractions of routed tokens, one panel per MoE layer: counts [K, L, E]."""
    frac_KLE = counts_KLE / counts_KLE.sum(-1, keepdim=True).clamp_min(1)
    fig, axes = plt.subplots(1, len(layers), figsize=(3 + 2 * len(layers), 2.5), squeeze=False)
    for l, layer in enumerate(layers):
        ax = axes[0, l]
        im = ax.imshow(frac_KLE[:, l].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(domains)), domains)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="fraction of domain tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
