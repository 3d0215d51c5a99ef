"""`shodh evaluate --run RUN_DIR`: score a pretrained run per domain, in latent and physical space.

For every trajectory of the configured splits (`eval.splits`, val and test by default):
- one-step prediction z_t -> z_{t+1} from the true latent, for every consecutive frame pair:
  latent MSE (normalized latent space, as in training), then the prediction decoded by the
  tokenizer (float64, physical units) against the raw field of frame t+1: MSE, VRMSE, nRMSE,
  binned spectral error, divergence with the tokenizer's audit operator; beside it the
  autoencoder floor (decode of the true latent z_{t+1} against the same raw field), the best
  any latent predictor can do with this tokenizer;
- (first split only) an autoregressive rollout from each trajectory's first frame, latent MSE
  and decoded VRMSE per step, and routing telemetry of the one-step pass for MoE runs.
Metrics go into the run's own MLflow run (reattached through RUN_DIR/mlflow_run_id) and its
metrics.jsonl at the checkpoint's step; plots and summary.json go to RUN_DIR/eval/ and to the
MLflow run's `eval/` artifacts; summary.json also keeps each split's per-sample latent MSE and
VRMSE (`per_sample`). Everything is deterministic: no sampling, no token dropping.

Metric names (DESIGN.md, plus the ones this stage adds), <s> = split, <d> = domain:
  <s>/<d>/latent_mse, decoded_mse, vrmse, nrmse, spectrum_err (mean of the three bands),
  spectrum_err_low|mid|high, divergence_max (max |div u| over samples), divergence_rel (that
  over rms |grad u|), ae_floor_mse, ae_floor_vrmse;
  rollout/<d>/step<k>/latent_mse, rollout/<d>/step<k>/vrmse;
  route/* as in training plus route/layer<l>/bifurcation/<d>.

Shape legend: B batch, T frames of a trajectory, C latent channels (or 3 velocity components),
X Y Z grid, S spectral shells (the project's legend, shodh/fields).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import yaml

from shodh.config import RunConfig, from_dict, yaml_error
from shodh.data.loader import DataConfig, read_manifest, split_samples
from shodh.errors import DataError, ShodhError
from shodh.eval import plots
from shodh.eval.routing import route_metrics
from shodh.fields import metrics as M
from shodh.fields.normalization import LatentNorm
from shodh.fields.spectral import divergence_stats
from shodh.io import write_json_atomic
from shodh.model.moe import router_inputs
from shodh.workspace import latent_dir, resolve_run_dir, resolve_tokenizer_id

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Trajectory:
    """One trajectory of a split: normalized latents and the matching raw frames."""

    domain: str
    index: int
    z_TCXYZ: torch.Tensor  # normalized latents (manifest stats), float32
    u_TCXYZ: torch.Tensor  # raw velocity of the same frames, float64, physical units
    mask_XYZ: torch.Tensor  # solid mask, static per trajectory


def load_run_config(run_dir: Path) -> RunConfig:
    path = run_dir / "config.yaml"
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise DataError(f"{path}: invalid YAML ({yaml_error(exc)})") from None
    return from_dict(RunConfig, data)


def _latent_windows(data: DataConfig, root: Path, tokenizer_id: str,
                    split: str) -> dict[tuple[str, int], dict[int, np.ndarray]]:
    """Normalized latent windows of a split, read with the loader's checks:
    {(domain, trajectory): {t0: z [T, C, 16, 16, 16]}}."""
    out: dict[tuple[str, int], dict[int, np.ndarray]] = defaultdict(dict)
    for z_TCXYZ, meta in split_samples(data, root, tokenizer_id, split):
        if not {"trajectory", "t0"} <= set(meta):
            raise DataError(f"{latent_dir(root, tokenizer_id) / split}: a {meta['domain']} sample's meta.json lacks "
                            f"trajectory or t0")
        out[(meta["domain"], int(meta["trajectory"]))][int(meta["t0"])] = z_TCXYZ
    return out


def _stitch(windows: dict[int, np.ndarray], where: str) -> tuple[np.ndarray, int]:
    """Windows of one trajectory (overlapping or not) -> (latents z [T, C, 16, 16, 16] from its
    first frame on, as far as the frames are contiguous; that first frame's index)."""
    frames: dict[int, np.ndarray] = {}
    for t0 in sorted(windows):
        for j, z in enumerate(windows[t0]):
            frames.setdefault(t0 + j, z)
    start = min(frames)
    t = start
    while t + 1 in frames:
        t += 1
    if t == start:
        raise DataError(f"{where}: fewer than two consecutive latent frames")
    return np.stack([frames[i] for i in range(start, t + 1)]), start


def _raw_frames(raw_manifest: dict, root: Path, split: str, domain: str,
                index: int) -> tuple[dict[int, np.ndarray], np.ndarray, str]:
    """Raw frames {frame: u [3, N, N, N]} and the mask [N, N, N] of one trajectory, the shard verified
    against the raw manifest (checksum, count, each frame's meta, dtype and magnitude)."""
    from shodh.tokenizer.data import raw_frames, shards_of

    records = [s for s in shards_of(raw_manifest, root, split)
               if s["domain"] == domain and int(s["trajectory"]) == index]
    if not records:
        raise DataError(f"{Path(root) / 'raw' / 'manifest.json'}: no {split} shard for {domain} trajectory {index}, "
                        f"which the latents reference")
    shard = str(records[0]["file"])
    u_by_frame, mask = {}, None
    for u, mask_XYZ, meta in raw_frames(records[0]):
        u_by_frame[int(meta["frame"])], mask = u, mask_XYZ
    return u_by_frame, mask, shard


def load_trajectories(manifest: dict, root: Path, tokenizer_id: str, grid: int, split: str,
                      limit: int) -> list[Trajectory]:
    """The split's trajectories in (domain order of the manifest, trajectory id) order."""
    from shodh.tokenizer.data import load_raw_manifest

    raw_manifest = load_raw_manifest(root, grid)
    windows = _latent_windows(DataConfig(), root, tokenizer_id, split)
    out = []
    for domain in manifest["domains"]:
        ids = sorted(i for d, i in windows if d == domain)
        for index in ids[:limit or None]:
            where = f"{latent_dir(root, tokenizer_id) / split}: {domain} trajectory {index}"
            z_TCXYZ, t0 = _stitch(windows[(domain, index)], where)
            u_by_frame, mask, shard = _raw_frames(raw_manifest, root, split, domain, index)
            missing = [t for t in range(t0, t0 + len(z_TCXYZ)) if t not in u_by_frame]
            if missing:
                raise DataError(f"{shard}: frames {missing} are in the latents but not in the raw shard")
            u_TCXYZ = np.stack([u_by_frame[t] for t in range(t0, t0 + len(z_TCXYZ))])
            out.append(Trajectory(domain, index, torch.from_numpy(z_TCXYZ),
                                  torch.from_numpy(u_TCXYZ).double(), torch.from_numpy(mask.astype(np.float32))))
    if not out:
        raise DataError(f"{latent_dir(root, tokenizer_id)}: no latents for split '{split}'")
    return out


class Evaluator:
    """Runs a latent model and the tokenizer over trajectories and accumulates per-domain metrics."""

    def __init__(self, model: torch.nn.Module, tokenizer, stats: dict, batch: int, device: torch.device,
                 dtype: torch.dtype):
        self.model, self.tok, self.batch, self.device, self.dtype = model, tokenizer, batch, device, dtype
        self.latent_norm = LatentNorm.from_stats(stats)

    @torch.no_grad()
    def predict(self, z_BCXYZ: torch.Tensor, telemetry=None, domain_id: int = 0) -> torch.Tensor:
        """Next normalized latent for each input, in chunks of `batch`: [B, C, 16, 16, 16] -> same."""
        out = []
        for chunk in z_BCXYZ.split(self.batch):
            labels = torch.full((len(chunk),), domain_id, dtype=torch.int64)
            routed = router_inputs(self.model.cfg.router.kind, labels)  # labels reach only an oracle router
            if telemetry is not None:
                with telemetry.labels(labels):
                    pred, _ = self.model(chunk.to(self.device, self.dtype), **routed)
            else:
                pred, _ = self.model(chunk.to(self.device, self.dtype), **routed)
            out.append(pred.float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, z_BCXYZ: torch.Tensor, mask_XYZ: torch.Tensor, domain: str) -> torch.Tensor:
        """Normalized latents -> physical velocity, float64 [B, 3, N, N, N] (on the CPU)."""
        out = []
        for chunk in z_BCXYZ.split(self.batch):
            raw = self.latent_norm.denormalize(chunk)  # the tokenizer decodes unnormalized encoder output
            masks = mask_XYZ.expand(len(chunk), *mask_XYZ.shape)
            out.append(self.tok.decode(raw, masks, domain).cpu())
        return torch.cat(out)


def _one_step(ev: Evaluator, traj: Trajectory, domain_id: int, telemetry) -> dict:
    """Per-pair one-step scores of a trajectory plus spectra and a mid-plane example."""
    z_in, z_true = traj.z_TCXYZ[:-1], traj.z_TCXYZ[1:]
    z_pred = ev.predict(z_in, telemetry, domain_id)
    u_true = traj.u_TCXYZ[1:]
    u_pred = ev.decode(z_pred, traj.mask_XYZ, traj.domain)
    u_ae = ev.decode(z_true, traj.mask_XYZ, traj.domain)
    div = divergence_stats(u_pred, ev.tok.operator)  # the audit's operator and measure
    return {
        "latent_mse": M.mse_B(z_pred.double(), z_true.double()),
        "decoded_mse": M.mse_B(u_pred, u_true),
        "vrmse": M.vrmse_BC(u_pred, u_true).mean(-1),
        "nrmse": M.nrmse_BC(u_pred, u_true).mean(-1),
        "spectrum_B3": M.spectral_error_B3(u_pred, u_true),
        "ae_floor_mse": M.mse_B(u_ae, u_true),
        "ae_floor_vrmse": M.vrmse_BC(u_ae, u_true).mean(-1),
        "divergence_max": div["max_abs"],
        "divergence_rel": div["rel_max"],
        "spectrum_true_S": M.energy_spectrum_BS(u_true).mean(0),
        "spectrum_pred_S": M.energy_spectrum_BS(u_pred).mean(0),
        "slice": (u_true[0], u_pred[0]),
    }


@torch.no_grad()
def _rollout(ev: Evaluator, traj: Trajectory, steps: int, domain_id: int) -> tuple[list[float], list[float]]:
    """Autoregressive rollout from the first frame: latent MSE and decoded VRMSE per step 1..steps."""
    z_hat = traj.z_TCXYZ[:1]
    latent, vrmse = [], []
    for k in range(1, steps + 1):
        z_hat = ev.predict(z_hat, domain_id=domain_id)
        latent.append(M.mse_B(z_hat.double(), traj.z_TCXYZ[k:k + 1].double()).item())
        u_hat = ev.decode(z_hat, traj.mask_XYZ, traj.domain)
        vrmse.append(M.vrmse_BC(u_hat, traj.u_TCXYZ[k:k + 1]).mean().item())
    return latent, vrmse


def evaluate_split(ev: Evaluator, trajectories: list[Trajectory], split: str, domains: list[str],
                   telemetry=None, rollout_steps: int | None = None,
                   per_sample: dict | None = None) -> tuple[dict[str, float], dict]:
    """Metrics of one split and what the plots need. rollout_steps None: no rollout; 0: as long as
    each trajectory allows. Means are over frame pairs of the domain; maxima over its samples.
    per_sample, if given, is filled with {domain: {"ids", "latent_mse", "vrmse"}}: one entry per
    frame pair (`<domain>_<traj>_<pair>`), the values those means average (paired statistics
    across runs, e.g. `shodh study`'s bootstrap)."""
    scores: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    figures: dict = {"spectra": {}, "slices": {}, "rollout": {}}
    for traj in trajectories:
        s = _one_step(ev, traj, domains.index(traj.domain), telemetry)
        acc = scores[traj.domain]
        for key in ("latent_mse", "decoded_mse", "vrmse", "nrmse", "ae_floor_mse", "ae_floor_vrmse"):
            acc[key] += s[key].tolist()
        acc["ids"] += [f"{traj.domain}_{traj.index:05d}_{j:05d}" for j in range(len(traj.z_TCXYZ) - 1)]
        acc["spectrum_B3"].append(s["spectrum_B3"])
        acc["divergence_max"].append(s["divergence_max"])
        acc["divergence_rel"].append(s["divergence_rel"])
        acc["spectrum_true"].append((s["spectrum_true_S"], len(traj.z_TCXYZ) - 1))
        acc["spectrum_pred"].append((s["spectrum_pred_S"], len(traj.z_TCXYZ) - 1))
        figures["slices"].setdefault(traj.domain, s["slice"])
        if rollout_steps is not None:
            steps = min(rollout_steps or len(traj.z_TCXYZ) - 1, len(traj.z_TCXYZ) - 1)
            acc["rollout"].append(_rollout(ev, traj, steps, domains.index(traj.domain)))
    out: dict[str, float] = {}
    for domain, acc in scores.items():
        if per_sample is not None:
            per_sample[domain] = {key: list(acc[key]) for key in ("ids", "latent_mse", "vrmse")}
        p = f"{split}/{domain}"
        for key in ("latent_mse", "decoded_mse", "vrmse", "nrmse", "ae_floor_mse", "ae_floor_vrmse"):
            out[f"{p}/{key}"] = float(np.mean(acc[key]))
        bands_3 = torch.cat(acc["spectrum_B3"]).mean(0)
        out[f"{p}/spectrum_err"] = bands_3.mean().item()
        for b, band in enumerate(M.BANDS):
            out[f"{p}/spectrum_err_{band}"] = bands_3[b].item()
        out[f"{p}/divergence_max"] = max(acc["divergence_max"])
        out[f"{p}/divergence_rel"] = max(acc["divergence_rel"])
        figures["spectra"][domain] = tuple(
            (sum(spec * n for spec, n in acc[name]) / sum(n for _, n in acc[name])).numpy()
            for name in ("spectrum_true", "spectrum_pred"))
        if acc["rollout"]:
            horizon = min(len(lat) for lat, _ in acc["rollout"])  # steps every trajectory reached
            latent_k = np.mean([lat[:horizon] for lat, _ in acc["rollout"]], axis=0)
            vrmse_k = np.mean([vr[:horizon] for _, vr in acc["rollout"]], axis=0)
            for k in range(horizon):
                out[f"rollout/{domain}/step{k + 1}/latent_mse"] = float(latent_k[k])
                out[f"rollout/{domain}/step{k + 1}/vrmse"] = float(vrmse_k[k])
            figures["rollout"][domain] = (latent_k, vrmse_k)
    return out, figures


def evaluate(cfg: RunConfig, root: Path, run: str) -> dict:
    """Evaluate run `run` (directory or name); log metrics and artifacts; return the summary."""
    from shodh.model.moe import RoutingTelemetry, no_token_dropping
    from shodh.tokenizer import load_tokenizer
    from shodh.tracking import Tracker
    from shodh.train.checkpoint import load_for_inference

    t_start = time.perf_counter()
    if cfg.eval.threads:
        torch.set_num_threads(cfg.eval.threads)
    root = Path(root)
    run_dir = resolve_run_dir(run, root, cfg.tracking.experiment)
    run_cfg = load_run_config(run_dir)
    tokenizer_id = resolve_tokenizer_id(root, run_cfg.train.tokenizer_id)
    if run_cfg.data.urls:
        raise ShodhError(f"{run_dir / 'config.yaml'}: data.urls={run_cfg.data.urls!r}; evaluate reads the latents "
                         f"from {latent_dir(root, tokenizer_id)} (copy them there)")
    manifest = read_manifest(root, tokenizer_id)
    domains = list(manifest["domains"])
    model, step, device, dtype = load_for_inference(run_cfg, run_dir, int(manifest["channels"]),
                                                    trust=cfg.train.trust_checkpoint)
    tok = load_tokenizer(root, device=device)
    if tok.id != tokenizer_id:
        raise DataError(f"{root / 'tokenizer'}: tokenizer {tok.id} is not the one run {run_dir.name} was trained on "
                        f"({tokenizer_id})")
    ev = Evaluator(model, tok, manifest["stats"], cfg.eval.batch, device, dtype)
    is_moe = run_cfg.model.kind == "moe"
    telemetry = RoutingTelemetry(model, domains, run_cfg.model.num_experts) if is_moe else None

    results: dict[str, float] = {}
    samples: dict[str, dict[str, int]] = {}
    per_sample: dict[str, dict] = {}
    figures: dict = {}
    with no_token_dropping(model):
        for i, split in enumerate(cfg.eval.splits):
            trajectories = load_trajectories(manifest, root, tokenizer_id, tok.grid, split, cfg.eval.trajectories)
            samples[split] = {d: sum(len(t.z_TCXYZ) - 1 for t in trajectories if t.domain == d) for d in domains}
            first = i == 0
            split_metrics, split_figures = evaluate_split(
                ev, trajectories, split, domains, telemetry if first else None,
                cfg.eval.rollout_steps if first else None, per_sample.setdefault(split, {}))
            results.update(split_metrics)
            if first:
                figures = split_figures
    out_dir = run_dir / "eval"
    out_dir.mkdir(parents=True, exist_ok=True)
    artifacts = [
        plots.mse_curves(run_dir / "metrics.jsonl", domains, out_dir / "mse_curves.png"),
        plots.rollout_curves(figures["rollout"], out_dir / "rollout.png"),
        plots.spectra(figures["spectra"], out_dir / "spectra.png"),
        plots.slices(figures["slices"], out_dir / "slices.png"),
    ]
    if telemetry is not None:
        results.update(route_metrics(telemetry))
        artifacts.append(plots.routing_heatmap(telemetry.counts_KLE, domains, [m.layer for m in telemetry.layers],
                                               out_dir / "routing.png"))
        telemetry.close()
    summary = {
        "run": run_dir.name, "run_dir": str(run_dir.resolve()), "step": step, "model": run_cfg.model.kind,
        "tokenizer_id": tokenizer_id, "operator": tok.operator, "splits": list(cfg.eval.splits),
        "samples": samples, "metrics": dict(sorted(results.items())), "per_sample": per_sample,
    }
    write_json_atomic(out_dir / "summary.json", summary)
    artifacts.append(out_dir / "summary.json")

    tracking = dataclasses.replace(cfg.tracking, experiment=run_cfg.tracking.experiment)
    tracker = Tracker(tracking, root, run_dir, run_dir.name)
    try:
        tracker.log_metrics(results, step)
        for path in artifacts:
            tracker.log_artifact(path, "eval")
    finally:
        tracker.close()
    log.info("evaluated %s at step %d in %.1f s: %s", run_dir, step, time.perf_counter() - t_start, out_dir)
    return summary
