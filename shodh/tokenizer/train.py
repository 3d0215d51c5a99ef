"""`shodh train-tokenizer`: fit the divergence-free autoencoder on raw shards, write the checkpoint.

Data parallel over processes (torch DDP: gloo on CPU, nccl on GPU); each rank streams its own
share of the train shards. Loss (normalized units): per component c, mean (v̂_c - v_c)² / σ_c²
with σ_c the domain's per-component std over the train split, i.e. the square of a VRMSE-like
score, so weak components (u_z in the channel) are not drowned by the mean-flow component.
State lives in ROOT/tokenizer/checkpoint.pt (model, optimizer, step; loadable with
weights_only=True) and a rerun resumes from it; the final weights go to tokenizer.pt with
tokenizer.json beside it. Metrics go to ROOT/runs/<experiment>/<tokenizer.run_name>/ and MLflow.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as torch_dist

from shodh.distributed import DistInfo, choose_device, init_process_group
from shodh.errors import DataError
from shodh.fields.metrics import vrmse_BC
from shodh.fields.normalization import Normalization
from shodh.fields.spectral import divergence_stats
from shodh.io import RunLock, sha256_file, sha256_json, write_atomic, write_json_atomic
from shodh.schedule import lr_factor
from shodh.tokenizer.config import TokenizerConfig
from shodh.tokenizer.data import load_raw_manifest, raw_frames, shards_of, stream_fields
from shodh.tokenizer.model import CHECKPOINT_FORMAT, TokenizerNet, build_net, velocity
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


def reconstruct(net: TokenizerNet, norm: Normalization, operator: str, u_BCXYZ: torch.Tensor,
                mask_BXYZ: torch.Tensor, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode + decode physical fields; returns (latent float32, velocity float64 physical)."""
    v = norm.normalize(u_BCXYZ.float(), domain)
    z = net.encode(v, mask_BXYZ.float())
    return z, norm.denormalize(velocity(net.decode(z, mask_BXYZ.float()).double(), operator), domain)


@torch.no_grad()
def evaluate(net: TokenizerNet, norm: Normalization, operator: str, manifest: dict, root: Path,
             split: str, max_fields: int, device: torch.device) -> tuple[dict, dict]:
    """Per-domain held-out metrics, and one (truth, reconstruction, mask) per domain to plot.

    leak_solid: rms |u| in solid cells over rms |u| in fluid cells, decoded; leak_solid_raw: the
    same for the simulator's field (Brinkman penalization leaves a little flow in solids too).
    """
    net.eval()
    metrics, examples = {}, {}
    for domain in manifest["domains"]:
        acc: dict[str, list] = {"mse": [], "vrmse": [], "leak": [], "leak_raw": [], "div": []}
        seen = 0
        for shard in (s for s in shards_of(manifest, root, split) if s["domain"] == domain):
            if max_fields and seen >= max_fields:
                break
            for u, mask, _ in raw_frames(shard):
                if max_fields and seen >= max_fields:
                    continue  # read on to the shard's end: its checksum is verified there
                u_t = torch.from_numpy(u)[None].to(device)
                m_t = torch.from_numpy(mask.astype(np.float32))[None].to(device)
                _, rec = reconstruct(net, norm, operator, u_t, m_t, domain)
                truth = u_t.double()
                acc["mse"].append(float((rec - truth).pow(2).mean()))
                acc["vrmse"].append(float(vrmse_BC(rec, truth).mean()))
                acc["div"].append(divergence_stats(rec, operator)["rel_max"])
                solid = m_t[0].bool()
                if solid.any() and (~solid).any():
                    speed, speed_raw = rec[0].pow(2).sum(0), truth[0].pow(2).sum(0)
                    acc["leak"].append(float(speed[solid].mean().sqrt() / speed[~solid].mean().sqrt()))
                    acc["leak_raw"].append(float(speed_raw[solid].mean().sqrt() / speed_raw[~solid].mean().sqrt()))
                if domain not in examples:
                    examples[domain] = (truth[0].cpu(), rec[0].cpu(), m_t[0].cpu())
                seen += 1
        if not seen:
            continue
        prefix = f"{split}/{domain}"
        metrics[f"{prefix}/mse"] = float(np.mean(acc["mse"]))
        metrics[f"{prefix}/vrmse"] = float(np.mean(acc["vrmse"]))
        metrics[f"{prefix}/divergence_max"] = float(np.max(acc["div"]))
        if acc["leak"]:
            metrics[f"{prefix}/leak_solid"] = float(np.mean(acc["leak"]))
            metrics[f"{prefix}/leak_solid_raw"] = float(np.mean(acc["leak_raw"]))
    net.train()
    return metrics, examples


def plot_slices(examples: dict, path: Path) -> Path:
    """Mid-plane (y = N/2) slices of u_x: truth / reconstruction / error, one row per domain."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(examples), 3, figsize=(10, 3.2 * len(examples)), squeeze=False)
    for row, (domain, (truth, rec, mask)) in enumerate(examples.items()):
        mid = truth.shape[-2] // 2
        t, r = truth[0, :, mid, :].numpy().T, rec[0, :, mid, :].numpy().T
        lo, hi = float(t.min()), float(t.max())
        for col, (img, title) in enumerate([(t, "truth"), (r, "reconstruction"), (r - t, "error")]):
            ax = axes[row, col]
            kwargs = {"vmin": lo, "vmax": hi} if col < 2 else {"cmap": "RdBu_r"}
            im = ax.imshow(img, origin="lower", **kwargs)
            ax.contour(mask[:, mid, :].numpy().T, levels=[0.5], colors="k", linewidths=0.5)
            ax.set_title(f"{domain}: u_x {title} (x-z, y=N/2)", fontsize=9)
            ax.set_xticks([]), ax.set_yticks([])
            fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


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
    identity = {"format": CHECKPOINT_FORMAT, "grid": manifest["grid"], "architecture": tcfg.architecture(),
                "raw_config_sha": manifest.get("config_sha"), "seed": cfg.seed, "steps": tcfg.steps,
                "batch": tcfg.batch, "lr": tcfg.lr, "warmup": tcfg.warmup, "world_size": info.world_size}
    identity_sha = sha256_json(identity)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    net = build_net(tcfg.architecture(), manifest["grid"]).to(device)
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

    run_dir = workspace_run_dir(root, cfg.tracking.experiment, tcfg.run_name)
    tracker = Tracker(cfg.tracking, root, run_dir, tcfg.run_name,
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
        loss = ((velocity(w_pred, tcfg.operator) - v).pow(2) * weight).mean()
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
            metrics, _ = evaluate(net, norm, tcfg.operator, manifest, root, "val", tcfg.eval_fields, device)
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
    """Held-out evaluation, audit, slice plot; write tokenizer.pt + tokenizer.json (rank 0)."""
    from shodh.tokenizer.audit import audit_net

    tcfg: TokenizerConfig = cfg.tokenizer
    metrics, examples = {}, {}
    for split in HELD_OUT:
        split_metrics, split_examples = evaluate(net, norm, tcfg.operator, manifest, root, split, tcfg.eval_fields, device)
        metrics.update(split_metrics)
        for domain, example in split_examples.items():
            examples.setdefault(domain, example)
    audit = audit_net(net, norm, tcfg.operator, manifest, root, device)
    metrics.update({f"audit/{k}": audit[k] for k in ("max_abs", "rel_max", "rel_rms")})
    tracker.log_metrics(metrics, step)
    run_dir = tracker.run_dir
    if examples:
        tracker.log_artifact(plot_slices(examples, run_dir / "plots" / "tokenizer_slices.png"), "plots")

    out_dir = tokenizer_dir(root)
    weights = out_dir / "tokenizer.pt"
    weights_cpu = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    write_atomic(weights, lambda tmp: torch.save(weights_cpu, tmp))
    digest = sha256_file(weights)
    n = manifest["grid"]
    info = {
        "format": CHECKPOINT_FORMAT, "id": digest[:16], "sha256": digest, "grid": n,
        "latent_shape": [tcfg.channels, LATENT, LATENT, LATENT], "compression": 3 * n**3 / (tcfg.channels * LATENT**3),
        "config": tcfg.architecture(), "training": dataclasses.asdict(tcfg), "seed": cfg.seed, "steps": step,
        "domains": list(manifest["domains"]), "normalization": norm.to_json(),
        "normalization_note": "u = mean[domain] + scale[domain] * v (scalar scale keeps div u = 0); "
                              "stats are the raw manifest's train-split statistics",
        "raw_config_sha": manifest.get("config_sha"), "metrics": metrics,
        "audit": {k: audit[k] for k in ("operator", "dtype", "max_abs", "rel_max", "rel_rms")},
        "loss": {k: (round(v, 6) if v is not None else None) for k, v in run.items()},
    }
    write_json_atomic(out_dir / "tokenizer.json", info)
    tracker.set_tags({"tokenizer_id": info["id"]})
    tracker.log_artifact(out_dir / "tokenizer.json")
    log.info("tokenizer %s written to %s", info["id"], out_dir)
    return info
