"""`shodh train-tokenizer`: fit the divergence-free autoencoder on raw shards, write the checkpoint.

Data parallel over processes (torch DDP: gloo on CPU, nccl on GPU); each rank streams its own
share of the train shards. Loss (normalized units): per component c, mean (v̂_c - v_c)² / σ_c²
with σ_c the domain's per-component std over the train split, i.e. the square of a VRMSE-like
score, so weak components (u_z in the channel) are not drowned by the mean-flow component;
solid cells count `tokenizer.solid_weight` times (the decoder must cancel the mean flow there,
and a smooth potential's curl would rather leak into the solids); all in `reconstruction_loss`.
No spectral term: after training, `fit_spectral_gain` lifts the shells the decoder under-fills
to `tokenizer.spectrum_target` of the true energy (see there), which costs less VRMSE than
asking the network for the energy.
State lives in ROOT/tokenizer/checkpoint.pt (model, optimizer, step; loadable with
weights_only=True) and a rerun resumes from it; the final weights go to tokenizer.pt with
tokenizer.json beside it. Metrics and figures go to ROOT/runs/<tokenizer.experiment>/<tokenizer.run_name>/
and MLflow (the tokenizer's own experiment, "shodh-tokenizer" by default).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist
from einops import rearrange

from shodh.distributed import DistInfo, choose_device, init_process_group
from shodh.errors import DataError
from shodh.eval import plots
from shodh.fields.metrics import BANDS, band_edges, band_of_S, energy_spectrum_BS, vrmse_BC
from shodh.fields.normalization import Normalization
from shodh.fields.spectral import divergence_stats, wavenumbers
from shodh.io import RunLock, sha256_file, sha256_json, write_atomic, write_json_atomic
from shodh.schedule import lr_factor
from shodh.tokenizer.config import TokenizerConfig
from shodh.tokenizer.data import data_band, domain_frames, load_raw_manifest, shards_of, stream_fields
from shodh.tokenizer.model import CHECKPOINT_FORMAT, TokenizerNet, build_net, gain_multipliers, reconstruct
from shodh.tracking import Tracker
from shodh.workspace import HELD_OUT, LATENT, lock_file, tokenizer_dir
from shodh.workspace import run_dir as workspace_run_dir

log = logging.getLogger(__name__)


def setup_process(cfg: TokenizerConfig, info: DistInfo) -> torch.device:
    """Threads, device and (for a multi-process launch) the process group of a tokenizer stage."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = choose_device(cfg.device, info)
    init_process_group(info, device)
    return device


# Train fields per domain whose mean spectrum sets the spectral gain (at most: one decode each,
# which costs time at large grids).
GAIN_FIELDS = 64


@torch.no_grad()
def mean_spectra(net: TokenizerNet, norm: Normalization, manifest: dict, root: Path,
                 device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{domain: (E_true [S], E_decoded [S])}: the mean energy spectra (float64, on the CPU) of the
    first GAIN_FIELDS train fields of each domain and of their reconstructions without a gain."""
    net.eval()
    spectra = {}
    for domain in manifest["domains"]:
        e_true, e_rec, seen = 0.0, 0.0, 0
        for u, mask in domain_frames(manifest, root, "train", domain, GAIN_FIELDS):
            u_t = torch.from_numpy(u)[None].to(device)
            _, rec = reconstruct(net, norm, u_t, torch.from_numpy(mask.astype(np.float32))[None].to(device), domain)
            e_true = e_true + energy_spectrum_BS(u_t.double())[0].cpu()
            e_rec = e_rec + energy_spectrum_BS(rec)[0].cpu()
            seen += 1
        if not seen:
            raise DataError(f"{Path(root) / 'raw' / 'manifest.json'}: no train field of domain '{domain}' "
                            "to fit the tokenizer's spectral gain on")
        spectra[domain] = (e_true / seen, e_rec / seen)
    net.train()
    return spectra


def spectral_gain(e_true_S: torch.Tensor, e_dec_S: torch.Tensor, k_max: int, target: float) -> list[float]:
    """Per shell, sqrt(max(1, target x E_true(k) / E_decoded(k))) for shells 1..k_max, 1 elsewhere:
    the gain that lifts every shell the decoder fills with less than `target` of the true energy
    to exactly that fraction (`tokenizer.spectrum_target`; 0: no gain)."""
    gain_S = torch.ones_like(e_true_S)
    shells = slice(1, k_max + 1)
    gain_S[shells] = (target * e_true_S[shells] / e_dec_S[shells].clamp_min(1e-300)).clamp_min(1).sqrt()
    return [float(g) for g in gain_S]


def fit_spectral_gain(net: TokenizerNet, norm: Normalization, manifest: dict, root: Path,
                      device: torch.device, target: float) -> dict[str, list[float]]:
    """Per domain, `spectral_gain` of the train split's mean spectra (`mean_spectra`), for shells
    1..K (the data's band, else N/2).

    A decoder trained for the least squared error returns, at scales whose phases the latent
    does not pin down, a damped estimate (the conditional mean): its spectrum falls below the
    truth's in the finest shells (to 0.19-0.33 of it in the worst shell, README Stage 2). Lifting
    a shell with a fixed gain g adds (g - 1)² E_decoded(k) of squared error there (exactly so
    for a conditional-mean decoder, whose error is uncorrelated with its output), less than
    asking the network for the energy through a spectral loss term cost (README, Stage 2). It
    is not free: lifting every shell to the full truth (target 1) costs the demo's channel 9 %
    of its VRMSE, so `target` trades spectrum for VRMSE (README, Stage 2: the curve). The gain
    is a real Fourier multiplier (`model.equalize`): decoded fields stay divergence-free and
    band-limited. It only lifts: shells the decoder fills with more than `target` of the truth
    keep gain 1."""
    return {domain: spectral_gain(e_true, e_rec, net.k_max, target)
            for domain, (e_true, e_rec) in mean_spectra(net, norm, manifest, root, device).items()}


def patch_comb_XYH(n: int, p: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """1 for the rfft modes of an N^3 grid with some |k_i| a nonzero multiple of N/p (the
    latent grid's sampling frequency), else 0: [N, N, H]. A pattern repeated in every p^3 patch
    (the mark of patch-wise decoding: seams, stripes) puts its energy there."""
    k_X, k_H = wavenumbers(n, dtype=torch.float64, device=device)
    step = n // p
    on_X, on_H = (k_X % step == 0) & (k_X != 0), (k_H % step == 0) & (k_H != 0)
    return (on_X.view(n, 1, 1) | on_X.view(1, n, 1) | on_H.view(1, 1, -1)).double()


def reconstruction_loss(pred_BCXYZ: torch.Tensor, true_BCXYZ: torch.Tensor, mask_BXYZ: torch.Tensor,
                        weight_BC111: torch.Tensor, tcfg: TokenizerConfig) -> torch.Tensor:
    """The training loss (normalized units): mean over cells of Σ_c (v̂_c - v_c)² / σ_c²
    (`weight_BC111` = 1/σ_c² of each field's domain), solid cells counted `tcfg.solid_weight`
    times."""
    cells_B1XYZ = rearrange(1 + (tcfg.solid_weight - 1) * mask_BXYZ, "b x y z -> b 1 x y z")
    return ((pred_BCXYZ - true_BCXYZ).pow(2) * weight_BC111 * cells_B1XYZ).mean()


def seam_ratio(u_BCXYZ: torch.Tensor, p: int) -> float:
    """rms of the cell-to-cell differences that cross a p-patch boundary over the rms of those
    inside patches, all three axes: ~1 for a field that does not know where patches are,
    above 1 for a blocky one (patch seams). Needs p > 1 (for p = 1 every difference crosses one)."""
    crossing, inside = [], []
    for axis in (-3, -2, -1):
        d = (u_BCXYZ.roll(-1, dims=axis) - u_BCXYZ).pow(2).movedim(axis, 0)
        last = torch.arange(d.shape[0], device=d.device) % p == p - 1
        crossing.append(d[last].mean())
        inside.append(d[~last].mean())
    return float((torch.stack(crossing).mean() / torch.stack(inside).mean()).sqrt())


@torch.no_grad()
def evaluate(net: TokenizerNet, norm: Normalization, manifest: dict, root: Path, split: str, max_fields: int,
             device: torch.device, gains: dict[str, torch.Tensor] | None = None) -> tuple[dict, dict]:
    """Per-domain held-out metrics of the decoder with the spectral `gains` (None: without; the
    evaluations during training, before the gain is fit), and per domain what the plots show.

    leak_solid: rms |u| in solid cells over rms |u| in fluid cells, decoded; leak_solid_raw: the
    same for the simulator's field (Brinkman penalization leaves a little flow in solids too).
    spectrum_ratio_min / _max: the extremes over shells 1..k_max (the data's band, else N/2) of
    the decoded over the true energy spectrum, both averaged over the split's fields.
    vrmse_ux / _uy / _uz: the VRMSE of each velocity component (`vrmse` is their mean; a weak
    component, like the channel's u_y and u_z, weighs as much as the mean-flow one).
    vrmse_low / _mid / _high: sqrt(Σ E_err / Σ E_true) over the shells of each band
    (`fields.metrics.band_edges`), i.e. a VRMSE restricted to those scales.
    seam_ratio (decoded) / seam_ratio_raw (the truth): `seam_ratio` at the patch size p (p > 1);
    comb_ratio: the decoded over the true energy on the patch comb (`patch_comb_XYH`), 1 when
    the decoder adds no pattern repeated in every patch (where the comb lies inside the band).
    Figures: {domain: {"example": (truth, reconstruction, mask) of the first field,
    "spectra": (E_true, E_decoded, E_error) [S] means, "k_max": ...}}.
    """
    net.eval()
    n = manifest["grid"]
    k_max = net.k_max
    # The comb is only measured where it lies inside the data's band (at 32³ N/p = 16 > band 10).
    comb_XYH = patch_comb_XYH(n, net.p, device) if net.p > 1 and n // net.p <= k_max else None
    metrics, figures = {}, {}
    for domain in manifest["domains"]:
        acc: dict[str, list] = {"mse": [], "vrmse_c": [], "leak": [], "leak_raw": [], "div": [], "spectra": [],
                                "seam": [], "seam_raw": [], "comb": []}
        seen = 0
        for u, mask in domain_frames(manifest, root, split, domain, max_fields):
            u_t = torch.from_numpy(u)[None].to(device)
            m_t = torch.from_numpy(mask.astype(np.float32))[None].to(device)
            _, rec = reconstruct(net, norm, u_t, m_t, domain, gains)
            truth = u_t.double()
            acc["mse"].append(float((rec - truth).pow(2).mean()))
            acc["vrmse_c"].append(vrmse_BC(rec, truth)[0].cpu().numpy())
            acc["div"].append(divergence_stats(rec, net.operator)["rel_max"])
            if comb_XYH is not None:
                acc["comb"].append(float(energy_spectrum_BS(rec, comb_XYH).sum() / energy_spectrum_BS(truth, comb_XYH).sum()))
            if net.p > 1:
                acc["seam"].append(seam_ratio(rec, net.p))
                acc["seam_raw"].append(seam_ratio(truth, net.p))
            acc["spectra"].append(torch.cat([energy_spectrum_BS(f) for f in (truth, rec, rec - truth)]).cpu())
            solid = m_t[0].bool()
            if solid.any() and (~solid).any():
                speed, speed_raw = rec[0].pow(2).sum(0), truth[0].pow(2).sum(0)
                acc["leak"].append(float(speed[solid].mean().sqrt() / speed[~solid].mean().sqrt()))
                acc["leak_raw"].append(float(speed_raw[solid].mean().sqrt() / speed_raw[~solid].mean().sqrt()))
            if domain not in figures:
                figures[domain] = {"example": (truth[0].cpu(), rec[0].cpu(), m_t[0].cpu()), "k_max": k_max}
            seen += 1
        if not seen:
            continue
        e_true_S, e_rec_S, e_err_S = torch.stack(acc["spectra"]).mean(0)
        figures[domain]["spectra"] = (e_true_S.numpy(), e_rec_S.numpy(), e_err_S.numpy())
        ratio_S = e_rec_S[1 : k_max + 1] / e_true_S[1 : k_max + 1].clamp_min(1e-300)
        prefix = f"{split}/{domain}"
        metrics[f"{prefix}/mse"] = float(np.mean(acc["mse"]))
        vrmse_c = np.mean(acc["vrmse_c"], axis=0)
        metrics[f"{prefix}/vrmse"] = float(vrmse_c.mean())
        metrics.update({f"{prefix}/vrmse_u{axis}": float(v) for axis, v in zip("xyz", vrmse_c)})
        metrics[f"{prefix}/divergence_max"] = float(np.max(acc["div"]))
        if acc["seam"]:
            metrics[f"{prefix}/seam_ratio"] = float(np.mean(acc["seam"]))
            metrics[f"{prefix}/seam_ratio_raw"] = float(np.mean(acc["seam_raw"]))
        if acc["comb"]:
            metrics[f"{prefix}/comb_ratio"] = float(np.mean(acc["comb"]))
        metrics[f"{prefix}/spectrum_ratio_min"] = float(ratio_S.min())
        metrics[f"{prefix}/spectrum_ratio_max"] = float(ratio_S.max())
        band_S = band_of_S(len(e_true_S), n)
        for b, name in enumerate(BANDS):
            sel_S = band_S == b
            metrics[f"{prefix}/vrmse_{name}"] = float((e_err_S[sel_S].sum() / e_true_S[sel_S].sum().clamp_min(1e-300)).sqrt())
        if acc["leak"]:
            metrics[f"{prefix}/leak_solid"] = float(np.mean(acc["leak"]))
            metrics[f"{prefix}/leak_solid_raw"] = float(np.mean(acc["leak_raw"]))
    net.train()
    return metrics, figures


def plot_figures(figures: dict, n: int, out_dir: Path) -> list[Path]:
    """The tokenizer run's evaluation figures: slices in two planes, spectra, VRMSE per shell."""
    slices = {d: f["example"][:2] for d, f in figures.items()}
    masks = {d: f["example"][2] for d, f in figures.items()}
    spectra = {d: f["spectra"][:2] for d, f in figures.items() if "spectra" in f}
    errors = {d: (f["spectra"][0], f["spectra"][2]) for d, f in figures.items() if "spectra" in f}
    cutoff = next(iter(figures.values()))["k_max"] if figures else None
    return [
        plots.slices(slices, out_dir / "tokenizer_slices_xy.png", plane="xy", masks=masks, label="decoded"),
        plots.slices(slices, out_dir / "tokenizer_slices_xz.png", plane="xz", masks=masks, label="decoded"),
        plots.spectra(spectra, out_dir / "tokenizer_spectra.png", cutoff=cutoff, label="decoded"),
        plots.shell_vrmse(errors, out_dir / "tokenizer_vrmse_per_shell.png", band_edges(n), cutoff=cutoff),
    ]


def lr_at(step: int, cfg: TokenizerConfig) -> float:
    """The shared schedule (shodh.schedule), decaying to 10% of `lr`."""
    return cfg.lr * lr_factor(step, cfg.warmup, cfg.steps, min_ratio=0.1)


def train(cfg, root: Path, info: DistInfo) -> dict:
    """Train (or resume) the tokenizer of RunConfig `cfg`; returns tokenizer.json's content on rank 0."""
    with RunLock(lock_file(tokenizer_dir(root), f"rank{info.rank}"), f"tokenizer training (rank {info.rank})"):
        return _train(cfg, Path(root), info)


def _train(cfg, root: Path, info: DistInfo) -> dict:
    tcfg: TokenizerConfig = cfg.tokenizer
    device = setup_process(tcfg, info)
    manifest = load_raw_manifest(root, cfg.sim.grid)
    norm = Normalization.from_raw_stats(manifest["stats"])
    train_shards = shards_of(manifest, root, "train")[info.rank :: info.world_size]
    if not train_shards:
        raise DataError(f"{Path(root) / 'raw' / 'manifest.json'}: no train shard for rank {info.rank} of "
                        f"{info.world_size}; use at most as many processes as train trajectories")
    arch = {**tcfg.architecture(), "band": data_band(manifest)}
    identity = {"format": CHECKPOINT_FORMAT, "grid": manifest["grid"], "architecture": arch,
                "raw_config_sha": manifest.get("config_sha"), "seed": cfg.seed, "steps": tcfg.steps,
                "batch": tcfg.batch, "lr": tcfg.lr, "warmup": tcfg.warmup,
                "solid_weight": tcfg.solid_weight, "world_size": info.world_size}
    identity_sha = sha256_json(identity)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_net(arch, manifest["grid"]).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=tcfg.lr, weight_decay=0.0)
    out_dir = tokenizer_dir(root)
    ckpt_path = out_dir / "checkpoint.pt"
    step = 0
    if ckpt_path.exists():
        state = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if state.get("identity") == identity_sha:
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            step = int(state["step"])
            log.info("resuming tokenizer training from %s at step %d", ckpt_path, step)
        else:
            log.warning("%s belongs to another tokenizer config; starting from scratch", ckpt_path)
    model = net
    if info.distributed:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)

    # The tokenizer's own experiment: its runs and plots stay apart from the pretraining runs.
    tracking = dataclasses.replace(cfg.tracking, experiment=tcfg.experiment)
    run_dir = workspace_run_dir(root, tracking.experiment, tcfg.run_name)
    tracker = Tracker(tracking, root, run_dir, tcfg.run_name,
                      params={"tokenizer": dataclasses.asdict(tcfg), "grid": manifest["grid"], "seed": cfg.seed},
                      tags={"stage": "tokenizer", "operator": tcfg.operator}, is_main=info.is_main,
                      resume_step=step)
    stream = stream_fields(train_shards, seed=cfg.seed * 1000 + info.rank + 7919 * step, buffer=tcfg.shuffle_buffer)
    weights = {d: torch.tensor(norm.loss_weights(d), device=device).view(3, 1, 1, 1) for d in manifest["domains"]}
    net.train()
    t0, fields = time.perf_counter(), 0
    first_loss = last_loss = None
    while step < tcfg.steps:
        batch = [next(stream) for _ in range(tcfg.batch)]
        v = torch.stack([norm.normalize(u, d) for u, _, d in batch]).to(device)
        mask = torch.stack([m for _, m, _ in batch]).to(device)
        weight = torch.stack([weights[d] for _, _, d in batch])
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, tcfg)
        _, w_pred = model(v, mask)
        v_pred = net.velocity(w_pred)
        loss = reconstruction_loss(v_pred, v, mask, weight, tcfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optimizer.step()
        step, fields = step + 1, fields + len(batch)
        last_loss = loss.item()
        first_loss = last_loss if first_loss is None else first_loss
        if step % 10 == 0 or step == tcfg.steps:
            rate = fields * info.world_size / (time.perf_counter() - t0)
            tracker.log_metrics({"train/loss": last_loss, "train/lr": lr_at(step - 1, tcfg),
                                 "perf/fields_per_s": rate}, step)
            log.info("step %d/%d loss %.4g (%.2f fields/s)", step, tcfg.steps, last_loss, rate)
        if info.is_main and (step % tcfg.checkpoint_every == 0 or step == tcfg.steps):
            out_dir.mkdir(parents=True, exist_ok=True)
            state = {"model": net.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                     "identity": identity_sha}
            write_atomic(ckpt_path, lambda tmp, state=state: torch.save(state, tmp))
        if tcfg.eval_every and step % tcfg.eval_every == 0 and step < tcfg.steps and info.is_main:
            metrics, _ = evaluate(net, norm, manifest, root, "val", tcfg.eval_fields, device)
            tracker.log_metrics(metrics, step)
    if info.distributed:
        torch_dist.barrier()
    result = {}
    if info.is_main:
        result = finish(net, norm, cfg, manifest, root, device, tracker, step,
                        {"first_loss": first_loss, "last_loss": last_loss, "wall_s": time.perf_counter() - t0})
    tracker.close()
    if info.distributed:
        torch_dist.barrier()
    return result


def finish(net: TokenizerNet, norm: Normalization, cfg, manifest: dict, root: Path, device: torch.device,
           tracker: Tracker, step: int, run: dict) -> dict:
    """Spectral gain (train split), held-out evaluation, audit, figures (of the first held-out
    split that has fields, val normally); write tokenizer.pt + tokenizer.json (rank 0)."""
    from shodh.tokenizer.audit import audit_net

    tcfg: TokenizerConfig = cfg.tokenizer
    gain_lists = fit_spectral_gain(net, norm, manifest, root, device, tcfg.spectrum_target)
    gains = gain_multipliers(gain_lists, manifest["grid"], device)
    metrics = {f"gain/{d}/max": max(g) for d, g in gain_lists.items()}
    figures = {}
    for split in HELD_OUT:
        split_metrics, split_figures = evaluate(net, norm, manifest, root, split, tcfg.eval_fields, device, gains)
        metrics.update(split_metrics)
        for domain, figure in split_figures.items():
            figures.setdefault(domain, figure)
    audit = audit_net(net, norm, manifest, root, device, gains=gains)
    metrics.update({f"audit/{k}": audit[k] for k in ("max_abs", "rel_max", "rel_rms")})
    tracker.log_metrics(metrics, step)
    for path in plot_figures(figures, manifest["grid"], tracker.run_dir / "plots") if figures else []:
        tracker.log_artifact(path, "plots")

    out_dir = tokenizer_dir(root)
    weights = out_dir / "tokenizer.pt"
    weights_cpu = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    write_atomic(weights, lambda tmp: torch.save(weights_cpu, tmp))
    digest = sha256_file(weights)
    n = manifest["grid"]
    info = {
        # The id names what decoding does: the weights and the gain (refit when spectrum_target
        # changes, with the same weights); the latents depend on the weights alone.
        "format": CHECKPOINT_FORMAT, "id": sha256_json({"weights": digest, "spectral_gain": gain_lists}),
        "sha256": digest, "grid": n,
        "latent_shape": [tcfg.channels, LATENT, LATENT, LATENT], "compression": 3 * n**3 / (tcfg.channels * LATENT**3),
        "config": {**tcfg.architecture(), "band": net.band}, "training": dataclasses.asdict(tcfg), "seed": cfg.seed,
        "steps": step,
        "domains": list(manifest["domains"]), "normalization": norm.to_json(),
        "normalization_note": "u = mean[domain] + scale[domain] * v (scalar scale keeps div u = 0); "
                              "stats are the raw manifest's train-split statistics",
        "spectral_gain": gain_lists,
        "spectral_gain_note": "decode multiplies each Fourier mode by its shell's (round |k|) gain, per domain; "
                              "fit on the train split to restore training.spectrum_target of each shell's true energy "
                              "(train.fit_spectral_gain)",
        "raw_config_sha": manifest.get("config_sha"), "metrics": metrics,
        "audit": {k: audit[k] for k in ("operator", "dtype", "max_abs", "rel_max", "rel_rms")},
        "loss": {k: (round(v, 6) if v is not None else None) for k, v in run.items()},
    }
    write_json_atomic(out_dir / "tokenizer.json", info)
    tracker.set_tags({"tokenizer_id": info["id"]})
    tracker.log_artifact(out_dir / "tokenizer.json")
    log.info("tokenizer %s written to %s", info["id"], out_dir)
    return info
