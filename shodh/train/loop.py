"""Pretraining: next-latent prediction on the mixed latent stream, one implementation for every launcher.

`pretrain()` is what `shodh pretrain`, `python -m shodh.pretrain`, `deepspeed --module
shodh.pretrain` and `srun python -m shodh.pretrain` all run. Per optimizer step and rank:
grad_accum micro batches of z_t -> z_{t+1}; loss = MSE + model.aux_loss_coef * Σ aux.
A step whose gradients are not finite is skipped by DeepSpeed's ZeRO optimizer (fp32 always;
bf16 with `check_grad_overflow`, set in ds_configs/): we count it, and stop after
train.max_bad_steps in a row, leaving the last good checkpoint as `latest`.

Metrics (rank 0, all-reduced over ranks): train/loss (the latent MSE, comparable across MoE and
dense), train/aux_loss (Σ over MoE layers of DeepSpeed's Switch loss, unweighted), train/lr,
train/grad_norm, train/skipped_steps, perf/tokens_per_s (latent tokens = patches, whole world),
perf/mfu (model FLOPs/s over world x per-device peak; the peak is train.peak_flops or a dense
matmul measured at startup, named in the `mfu_peak` tag), route/* (moe.RoutingTelemetry),
val/<domain>/latent_mse (no token dropping).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from shodh.config import RunConfig
from shodh.data.loader import LatentStream, eval_batches, read_manifest
from shodh.data.shards import read_json, write_json_atomic, write_text_atomic
from shodh.distributed import DistInfo
from shodh.errors import ShodhError
from shodh.model.moe import RoutingTelemetry, no_token_dropping, router_inputs
from shodh.model.transformer import count_params, forward_flops_per_token
from shodh.tracking import Tracker
from shodh.train import checkpoint, preempt
from shodh.train.engine import build_engine, check_layout, init_distributed, load_ds_config

log = logging.getLogger(__name__)


def resolve_tokenizer_id(cfg: RunConfig, root: Path) -> str:
    if cfg.train.tokenizer_id:
        return cfg.train.tokenizer_id
    path = Path(root) / "tokenizer" / "tokenizer.json"
    if not path.is_file():
        raise ShodhError(f"{path}: no tokenizer; run `shodh train-tokenizer` first or set train.tokenizer_id")
    tid = read_json(path, "tokenizer metadata").get("id")
    if not tid:
        raise ShodhError(f"{path}: has no 'id'")
    return str(tid)


def run_dir_for(cfg: RunConfig, root: Path, run_name: str | None) -> Path:
    """ROOT/runs/<experiment>/<run-name>; the default name makes a repeated command resume its run."""
    return Path(root) / "runs" / cfg.tracking.experiment / (run_name or f"{cfg.profile}-{cfg.model.kind}")


def measure_peak_flops(device: torch.device, dtype: torch.dtype) -> float:
    """Best dense-matmul FLOP/s of this process on its device (CPU fp32 / GPU bf16)."""
    n = 1024 if device.type == "cpu" else 8192
    gen = torch.Generator(device).manual_seed(0)  # the global RNG drives token selection: leave it alone
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    best = 0.0
    for _ in range(5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        (a @ b).sum().item()
        best = max(best, 2 * n**3 / (time.perf_counter() - t))
    return best


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after `step` (a crash between checkpoints logged them; the resumed run
    logs those steps again), so metrics.jsonl holds each step once."""
    if not path.is_file():
        return
    keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(line + "\n" for line in keep))


def _mean_over_world(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def validate(engine, cfg: RunConfig, root: Path, tokenizer_id: str, domains: list[str], info: DistInfo,
             dtype: torch.dtype) -> dict[str, float]:
    """val/<domain>/latent_mse over the val split (or train.val_batches per rank), without token dropping."""
    device = engine.device
    sums_K = torch.zeros(len(domains), dtype=torch.float64, device=device)
    counts_K = torch.zeros_like(sums_K)
    engine.eval()
    with torch.no_grad(), no_token_dropping(engine.module):
        batches = eval_batches(cfg.data, root, tokenizer_id, "val", cfg.train.val_micro_batch, info.rank, info.world_size)
        for i, batch in enumerate(batches):
            if cfg.train.val_batches and i >= cfg.train.val_batches:
                break  # every rank yields the same number of batches, so all stop together
            pred, _ = engine(batch["z_in"].to(device, dtype), **router_inputs(cfg.model.router, batch["domain"]))
            mse_B = (pred.float() - batch["z_out"].to(device)).pow(2).mean(dim=(1, 2, 3, 4)).double()
            valid_B = batch["valid"].to(device)
            domain_B = batch["domain"].to(device)
            sums_K.index_add_(0, domain_B[valid_B], mse_B[valid_B])
            counts_K.index_add_(0, domain_B[valid_B], torch.ones_like(mse_B[valid_B]))
    engine.train()
    dist.all_reduce(sums_K)
    dist.all_reduce(counts_K)
    return {f"val/{d}/latent_mse": (sums_K[k] / counts_K[k]).item()
            for k, d in enumerate(domains) if counts_K[k] > 0}


def routing_heatmap(telemetry: RoutingTelemetry, path: Path) -> None:
    """Domain x expert fractions per MoE layer, for the tokens counted since the last reset."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts_KLE = telemetry.counts_KLE
    frac_KLE = counts_KLE / counts_KLE.sum(-1, keepdim=True).clamp_min(1)
    L = frac_KLE.shape[1]
    fig, axes = plt.subplots(1, L, figsize=(3 + 2 * L, 2.5), squeeze=False)
    for l, layer in enumerate(telemetry.layers):
        ax = axes[0, l]
        im = ax.imshow(frac_KLE[:, l].numpy(), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(f"layer {layer.layer}")
        ax.set_xlabel("expert")
        ax.set_yticks(range(len(telemetry.domains)), telemetry.domains)
    fig.colorbar(im, ax=axes.ravel().tolist(), label="fraction of domain tokens")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def pretrain(cfg: RunConfig, root: Path, run_name: str | None, info: DistInfo) -> Path:
    """Train (or resume) one run; returns its run directory."""
    root = Path(root)
    train = cfg.train
    preempt.install()  # SIGUSR1 from slurm/*.sbatch: checkpoint at the next step, exit 75
    layout = check_layout(cfg.model, train, info)
    run_dir = run_dir_for(cfg, root, run_name)
    ckpt_dir = run_dir / "checkpoints"
    layout_key = {"world_size": info.world_size, "ep_size": cfg.model.ep_size}
    found = checkpoint.inspect(ckpt_dir, layout_key, train.resume)
    tokenizer_id = resolve_tokenizer_id(cfg, root)
    channels = int(read_manifest(root, tokenizer_id, cfg.data.urls)["channels"])
    ds_config = load_ds_config(train, layout)

    info = init_distributed(info)
    weights_only = found is not None and train.resume == "weights"
    start = found[1] if found else 0
    engine, model = build_engine(cfg.model, train, layout, ds_config, channels, cfg.seed,
                                 lr_offset=start if weights_only else 0)
    dtype = torch.bfloat16 if engine.bfloat16_enabled() else torch.float32
    # A weights-only resume cannot continue the old stream (its split depends on the world
    # size): start a fresh one, seeded by the step so it does not replay the first batches.
    stream = LatentStream(cfg.data, root, tokenizer_id, "train", batch_size=train.micro_batch, rank=info.rank,
                          world_size=info.world_size, seed=cfg.seed + (start if weights_only else 0))
    step = 0
    if found:
        resumed = checkpoint.restore(engine, ckpt_dir, found[0], info.rank, train.resume)
        step = resumed.step
        if resumed.loader_state is not None:
            stream.load_state_dict(resumed.loader_state)
        log.info("resumed %s at step %d from %s", "fully" if resumed.full else "weights only", step, found[0])

    resolved = dataclasses.asdict(cfg)
    params = count_params(model)
    flops_fwd = forward_flops_per_token(cfg.model, channels)
    peak = train.peak_flops or measure_peak_flops(engine.device, dtype)
    peak = _mean_over_world([peak], engine.device)[0]
    peak_note = (f"configured train.peak_flops={train.peak_flops:.3g}" if train.peak_flops else
                 f"measured {dtype_name(dtype)} matmul {peak:.3g} FLOP/s per rank")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        write_json_atomic(run_dir / "ds_config.json", ds_config)
        if step:
            _truncate_metrics(run_dir / "metrics.jsonl", step)
    mix = ",".join(f"{d}:{w:g}" for d, w in cfg.data.weights.items() if w > 0)
    tracker = Tracker(cfg.tracking, root, run_dir, run_dir.name, params=resolved, is_main=info.is_main,
                      tags={"model": "moe" if cfg.model.kind == "moe" else "dense", "model_kind": cfg.model.kind,
                            "mix": mix, "tokenizer_id": tokenizer_id, "mfu_peak": peak_note,
                            "params_total": str(params["total"]), "params_active": str(params["active"])})
    if info.is_main:
        log.info("run %s: %s, params total %d active %d, %d rank(s), global batch %d, %s", run_dir,
                 cfg.model.kind, params["total"], params["active"], info.world_size, layout.global_batch, peak_note)
    telemetry = RoutingTelemetry(model, stream.domains, cfg.model.num_experts) if cfg.model.kind == "moe" else None
    status = "FAILED"
    try:
        step = _train(engine, cfg, root, tokenizer_id, info, layout, stream, telemetry, tracker, ckpt_dir,
                      step, dtype, flops_fwd, peak, run_dir)
        status = "FINISHED"
    except preempt.Preempted:
        status = "KILLED"  # the requeued job reattaches to this MLflow run and sets it RUNNING
        raise
    finally:
        tracker.close(status)
        if telemetry is not None:
            telemetry.close()
    return run_dir


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _train(engine, cfg: RunConfig, root: Path, tokenizer_id: str, info: DistInfo, layout, stream: LatentStream,
           telemetry: RoutingTelemetry | None, tracker: Tracker, ckpt_dir: Path, step: int, dtype: torch.dtype,
           flops_fwd: int, peak: float, run_dir: Path) -> int:
    train, device = cfg.train, engine.device
    layout_key = {"world_size": info.world_size, "ep_size": cfg.model.ep_size}
    resolved = dataclasses.asdict(cfg)
    tokens_per_sample = cfg.model.tokens
    batches = iter(stream)
    decoded_val = None
    if cfg.eval.in_training:
        from shodh.eval.evaluate import decoded_validation

        decoded_val = decoded_validation(cfg, root, tokenizer_id, engine.module, device, dtype)
    mse_sum = aux_sum = 0.0
    n_logged = bad_in_row = skipped = 0
    busy = 0.0  # seconds spent in training steps since the last log (no validation, no checkpoints)
    last_good = checkpoint.latest_tag(ckpt_dir)

    def flush_routes(at: int) -> None:
        if telemetry is None:
            return
        telemetry.all_reduce()
        tracker.log_metrics(telemetry.metrics(), at)
        if info.is_main and at == train.max_steps:
            routing_heatmap(telemetry, run_dir / "plots" / "routing.png")
            tracker.log_artifact(run_dir / "plots" / "routing.png", "plots")
        telemetry.reset()

    while step < train.max_steps:
        t0 = time.perf_counter()
        for _ in range(train.grad_accum):
            batch = next(batches)
            z_in = batch["z_in"].to(device, dtype)
            context = telemetry.labels(batch["domain"]) if telemetry is not None else contextlib.nullcontext()
            with context:
                pred, aux = engine(z_in, **router_inputs(cfg.model.router, batch["domain"]))
            mse = F.mse_loss(pred.float(), batch["z_out"].to(device))
            engine.backward(mse + cfg.model.aux_loss_coef * aux.float())
            engine.step()
            mse_sum += mse.item() / train.grad_accum
            aux_sum += aux.item() / train.grad_accum
        busy += time.perf_counter() - t0
        step += 1
        n_logged += 1
        if engine.was_step_applied():
            bad_in_row = 0
        else:
            bad_in_row, skipped = bad_in_row + 1, skipped + 1
            log.warning("step %d: non-finite gradients, step skipped (%d in a row)", step, bad_in_row)
            if bad_in_row >= train.max_bad_steps:
                tracker.log_metrics({"train/skipped_steps": skipped}, step)
                raise ShodhError(f"{bad_in_row} consecutive non-finite steps (train.max_bad_steps); stopped at "
                                 f"step {step}. Last good checkpoint: {last_good or 'none'} in {ckpt_dir}")

        if step % train.log_every == 0 or step == train.max_steps:
            mse_avg, aux_avg, busy_avg = _mean_over_world([mse_sum / n_logged, aux_sum / n_logged, busy], device)
            tokens_per_s = n_logged * layout.global_batch * tokens_per_sample / busy_avg
            grad_norm = engine.get_global_grad_norm()
            tracker.log_metrics({
                "train/loss": mse_avg, "train/aux_loss": aux_avg, "train/lr": engine.get_lr()[0],
                "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
                "train/skipped_steps": skipped, "perf/tokens_per_s": tokens_per_s,
                "perf/mfu": tokens_per_s * 3 * flops_fwd / (peak * info.world_size),
            }, step)
            if info.is_main:
                log.info("step %d loss %.5f aux %.4f %.0f tok/s", step, mse_avg, aux_avg, tokens_per_s)
            mse_sum = aux_sum = busy = 0.0
            n_logged = 0
        is_val = step % train.val_every == 0 or step == train.max_steps
        if step % train.route_every == 0 or is_val:
            flush_routes(step)
        if is_val:
            tracker.log_metrics(validate(engine, cfg, root, tokenizer_id, stream.domains, info, dtype), step)
            if decoded_val is not None:
                tracker.log_metrics(decoded_val(), step)
        if step % train.ckpt_every == 0 or step == train.max_steps:
            last_good = checkpoint.save(engine, ckpt_dir, step, info.rank, layout_key, stream.state_dict(), resolved)
        if step < train.max_steps and preempt.requested(device):
            if step % train.ckpt_every != 0:
                checkpoint.save(engine, ckpt_dir, step, info.rank, layout_key, stream.state_dict(), resolved)
            log.warning("SIGUSR1: checkpointed step %d in %s; exiting with status %d for a requeue",
                        step, ckpt_dir, preempt.PREEMPT_EXIT)
            raise preempt.Preempted(step)
    return step

