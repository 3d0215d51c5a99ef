"""Pretraining: next-latent prediction on the mixed latent stream, one implementation for every launcher.

`pretrain()` is what `shodh pretrain`, `python -m shodh.pretrain`, `deepspeed --module
shodh.pretrain` and `srun python -m shodh.pretrain` all run. It builds a `Trainer` (the run's
state: engine, stream, telemetry, tracker, counters) and calls `fit()`. Per optimizer step and
rank: grad_accum micro batches of z_t -> z_{t+1}; loss = MSE + model.aux_loss_coef * Σ balance loss
+ model.router.z_loss * Σ z-loss (moe.RouterLoss); balance=bias routers update their bias after each step.
A step whose gradients are not finite is skipped by DeepSpeed's ZeRO optimizer (fp32 always;
bf16 with `check_grad_overflow`, set in ds_configs/): we count it, and stop once
train.max_bad_steps of the last train.bad_window steps were skipped (a streak, or bad steps
interleaved with good ones). No checkpoint is written while the latest step was skipped or when
the state is not finite (checkpoint.state_is_finite), so `latest` only ever names a finite state
from outside a bad streak; on a stop, that checkpoint is loaded back and checked before it is
named as the one to resume from.

Training knows nothing of evaluation: later stages plug in as `Callback`s (shodh.eval.callbacks
gives the decoded validation and the routing heatmap), called at validations, at routing flushes
and at the end, on every rank in lockstep.

Metrics (rank 0, all-reduced over ranks): train/loss (the latent MSE, comparable across MoE and
dense), train/aux_loss (Σ over MoE layers of the model.router.balance loss, unweighted), train/z_loss
(Σ over MoE layers of the router z-loss, unweighted), train/lr,
train/grad_norm, train/skipped_steps, perf/tokens_per_s (latent tokens = patches, whole world),
perf/mfu (model FLOPs/s over world x per-device peak; the peak is train.peak_flops or a dense
matmul measured at startup, named in the `mfu_peak` tag), route/* (moe.RoutingTelemetry),
val/<domain>/latent_mse (no token dropping), train/skipped_samples (data.on_error=skip),
train/nonfinite_loss_steps (steps whose loss was NaN/inf; the loss itself is then not logged).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import yaml

from shodh.config import RunConfig
from shodh.data.loader import LatentStream, eval_batches, read_manifest
from shodh.distributed import DistInfo, choose_device, init_process_group
from shodh.errors import ShodhError
from shodh.io import RunLock, write_json_atomic, write_text_atomic
from shodh.model.moe import RoutingTelemetry, no_token_dropping, router_inputs, update_router_biases
from shodh.model.params import count_params
from shodh.model.transformer import forward_flops_per_token
from shodh.tracking import Tracker
from shodh.train import checkpoint, preempt, reshard
from shodh.train.engine import build_engine, check_layout, load_ds_config
from shodh.workspace import lock_file, resolve_tokenizer_id, run_dir

log = logging.getLogger(__name__)


class Callback:
    """A hook into training. Every method runs on every rank at the same step (a callback may use
    collectives, e.g. an MoE forward); metrics returned are logged by rank 0."""

    def on_start(self, trainer: "Trainer") -> None:
        """Called once before the first step of this process (fresh or resumed): fail early here."""

    def on_validation(self, trainer: "Trainer", step: int) -> dict[str, float]:
        return {}

    def on_routes(self, trainer: "Trainer", telemetry: RoutingTelemetry, step: int) -> None:
        """Called with the routing counts of the interval ending at `step`, before they are reset."""

    def on_end(self, trainer: "Trainer", step: int) -> None:
        """Called once after the last step (not after a preemption or an error)."""


def run_dir_for(cfg: RunConfig, root: Path, run_name: str | None) -> Path:
    """ROOT/runs/<experiment>/<run-name>; the default name makes a repeated command resume its run."""
    return run_dir(root, cfg.tracking.experiment, run_name or f"{cfg.profile}-{cfg.model.kind}")


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


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _mean_over_world(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


class Trainer:
    """One pretraining run on one rank: built (or resumed) by the constructor, run by `fit()`."""

    def __init__(self, cfg: RunConfig, root: Path, run_name: str | None, info: DistInfo,
                 callbacks: list[Callback] = ()):
        self.root, self.callbacks = Path(root), list(callbacks)
        self.run_dir = run_dir_for(cfg, self.root, run_name)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.layout_key = {"world_size": info.world_size, "ep_size": cfg.model.ep_size}
        found = checkpoint.inspect(self.ckpt_dir, self.layout_key, cfg.train.resume, dataclasses.asdict(cfg.model))
        # Elastic resume onto another layout: checked (and grad_accum derived) before anything is built.
        elastic = reshard.plan(self.ckpt_dir / found[0], cfg, info.world_size) if found and \
            cfg.train.resume == "elastic" else None
        if elastic is not None:
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, grad_accum=elastic.grad_accum))
        self.cfg = cfg
        train = cfg.train
        self.layout = check_layout(cfg.model, train, info)
        self.tokenizer_id = resolve_tokenizer_id(self.root, train.tokenizer_id)
        self.channels = channels = int(read_manifest(self.root, self.tokenizer_id, cfg.data.urls)["channels"])
        ds_config = load_ds_config(train, self.layout)

        self.device = choose_device("auto", info)
        self.info = init_process_group(info, self.device, always=True)
        if elastic is not None:
            found = (self._convert(found[0], elastic, info), found[1])
        weights_only = found is not None and train.resume == "weights"
        # The per-rank streams depend on the world size: a weights-only resume, or an elastic one onto
        # another world size, starts fresh streams (shodh.data.loader.remap_states states the guarantee).
        fresh_stream = weights_only or (elastic is not None and elastic.world_changed)
        start = found[1] if found else 0
        self.engine, self.model = build_engine(cfg.model, train, self.layout, ds_config, channels, cfg.seed,
                                               lr_offset=start if weights_only else 0)
        self.dtype = torch.bfloat16 if self.engine.bfloat16_enabled() else torch.float32
        # A fresh stream is seeded by the step so it does not replay the first batches.
        self.stream = LatentStream(cfg.data, self.root, self.tokenizer_id, "train", batch_size=train.micro_batch,
                                   rank=info.rank, world_size=info.world_size,
                                   seed=cfg.seed + (start if fresh_stream else 0))
        self.step = 0
        if found:
            resumed = checkpoint.restore(self.engine, self.ckpt_dir, found[0], info.rank, train.resume,
                                         train.trust_checkpoint)
            self.step = resumed.step
            if resumed.loader_state is not None:
                self.stream.load_state_dict(resumed.loader_state)
            how = "elastically" if elastic is not None else "fully" if resumed.full else "weights only"
            log.info("resumed %s at step %d from %s", how, self.step, found[0])
        self.last_good = checkpoint.latest_tag(self.ckpt_dir)

        self.resolved = dataclasses.asdict(cfg)
        params = count_params(self.model)
        self.flops_fwd = forward_flops_per_token(cfg.model, channels)
        peak = train.peak_flops or measure_peak_flops(self.engine.device, self.dtype)
        self.peak = _mean_over_world([peak], self.engine.device)[0]
        peak_note = (f"configured train.peak_flops={train.peak_flops:.3g}" if train.peak_flops else
                     f"measured {dtype_name(self.dtype)} matmul {self.peak:.3g} FLOP/s per rank")
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.run_dir / "config.yaml", yaml.safe_dump(self.resolved, sort_keys=False))
            write_json_atomic(self.run_dir / "ds_config.json", ds_config)
        mix = ",".join(f"{d}:{w:g}" for d, w in cfg.data.weights.items() if w > 0)
        # resume_step: metrics.jsonl keeps steps <= self.step (none on a fresh start or a restart
        # before the first checkpoint), and MLflow does not get the later ones a second time.
        self.tracker = Tracker(cfg.tracking, self.root, self.run_dir, self.run_dir.name, params=self.resolved,
                               is_main=info.is_main, resume_step=self.step,
                               tags={"model": "moe" if cfg.model.kind == "moe" else "dense",
                                     "model_kind": cfg.model.kind, "mix": mix, "tokenizer_id": self.tokenizer_id,
                                     "mfu_peak": peak_note, "params_total": str(params["total"]),
                                     "params_active": str(params["active"])})
        if info.is_main:
            log.info("run %s: %s, params total %d active %d, %d rank(s), global batch %d, %s", self.run_dir,
                     cfg.model.kind, params["total"], params["active"], info.world_size, self.layout.global_batch,
                     peak_note)
        self.telemetry = (RoutingTelemetry(self.model, self.stream.domains, cfg.model.num_experts)
                          if cfg.model.kind == "moe" else None)
        self.skipped = 0  # non-finite steps skipped so far in this process
        self.nonfinite_losses = 0  # steps whose mean loss was NaN/inf
        self.bad_in_row = 0
        self.recent_bad: collections.deque[bool] = collections.deque(maxlen=train.bad_window)

    def _convert(self, tag: str, target: "reshard.Target", info: DistInfo) -> str:
        """The tag of `tag` converted to this layout: rank 0 writes it unless a complete one exists;
        its outcome is broadcast, so every rank fails with rank 0's error instead of waiting."""
        new = reshard.converted_tag(tag, target.world_size, target.ep_size)
        error = None
        if info.is_main and not (self.ckpt_dir / new / checkpoint.MANIFEST).is_file():
            try:
                reshard.convert(self.ckpt_dir / tag, self.ckpt_dir / new, target, self.cfg.train.trust_checkpoint)
            except ShodhError as exc:
                error = str(exc)
        outcome = [error]
        dist.broadcast_object_list(outcome, src=0)
        if outcome[0] is not None:
            raise ShodhError(outcome[0])
        return new

    @property
    def domains(self) -> list[str]:
        return self.stream.domains

    # ------------------------------------------------------------ the loop

    def fit(self) -> Path:
        """Train to train.max_steps (or a preemption); returns the run directory."""
        status = "FAILED"
        try:
            self._loop()
            status = "FINISHED"
        except preempt.Preempted:
            status = "KILLED"  # the requeued job reattaches to this MLflow run and sets it RUNNING
            raise
        finally:
            self.tracker.close(status)
            if self.telemetry is not None:
                self.telemetry.close()
        return self.run_dir

    def _loop(self) -> None:
        train = self.cfg.train
        for callback in self.callbacks:
            callback.on_start(self)
        batches = iter(self.stream)
        mse_sum = aux_sum = z_sum = 0.0
        n_logged = 0
        busy = 0.0  # seconds spent in training steps since the last log (no validation, no checkpoints)
        while self.step < train.max_steps:
            t0 = time.perf_counter()
            for _ in range(train.grad_accum):
                mse, aux, z = self._micro_step(next(batches))
                mse_sum += mse / train.grad_accum
                aux_sum += aux / train.grad_accum
                z_sum += z / train.grad_accum
            update_router_biases(self.model)
            busy += time.perf_counter() - t0
            self.step += 1
            n_logged += 1
            step = self.step
            self._count_bad(step, applied=self.engine.was_step_applied())
            last = step == train.max_steps
            if step % train.log_every == 0 or last:
                self._log_train(mse_sum / n_logged, aux_sum / n_logged, z_sum / n_logged, busy, n_logged)
                mse_sum = aux_sum = z_sum = busy = 0.0
                n_logged = 0
            is_val = step % train.val_every == 0 or last
            if step % train.route_every == 0 or is_val:
                self._flush_routes()
            if is_val:
                self.tracker.log_metrics(self.validate(), step)
                for callback in self.callbacks:
                    self.tracker.log_metrics(callback.on_validation(self, step), step)
            if step % train.ckpt_every == 0 or last:
                self.last_good = self.save() or self.last_good
            if not last and preempt.requested(self.device):
                if step % train.ckpt_every != 0:
                    self.last_good = self.save() or self.last_good
                log.warning("SIGUSR1: checkpointed step %d in %s; exiting with status %d for a requeue",
                            step, self.ckpt_dir, preempt.PREEMPT_EXIT)
                raise preempt.Preempted(step)
        for callback in self.callbacks:
            callback.on_end(self, self.step)

    def _count_bad(self, step: int, applied: bool) -> None:
        """Track skipped (non-finite) steps; stop when train.max_bad_steps of the last bad_window were."""
        train = self.cfg.train
        self.recent_bad.append(not applied)
        if applied:
            self.bad_in_row = 0
            return
        self.bad_in_row, self.skipped = self.bad_in_row + 1, self.skipped + 1
        bad = sum(self.recent_bad)
        log.warning("step %d: non-finite gradients, step skipped (%d in a row, %d of the last %d steps)",
                    step, self.bad_in_row, bad, len(self.recent_bad))
        if bad >= train.max_bad_steps:
            self.tracker.log_metrics({"train/skipped_steps": self.skipped,
                                      "train/nonfinite_loss_steps": self.nonfinite_losses}, step)
            raise ShodhError(f"{bad} of the last {len(self.recent_bad)} steps had non-finite gradients "
                             f"(train.max_bad_steps={train.max_bad_steps} per train.bad_window={train.bad_window}); "
                             f"stopped at step {step}. {self._last_good_note()}")

    def _last_good_note(self) -> str:
        """Which checkpoint to resume from, after loading it back and checking it is finite."""
        if self.last_good is None:
            return f"No checkpoint was written in {self.ckpt_dir}: lower train.lr or check the data, then restart."
        if checkpoint.finite_weights(self.cfg.model, self.run_dir, self.channels, self.last_good):
            return (f"Last good checkpoint (loads, finite weights): {self.last_good} in {self.ckpt_dir}; "
                    f"the run resumes from it when restarted")
        return (f"The latest checkpoint {self.last_good} in {self.ckpt_dir} does not load with finite weights: "
                f"do not resume from it")

    def _micro_step(self, batch: dict) -> tuple[float, float, float]:
        """Forward, backward and (at the accumulation boundary, DeepSpeed decides) the optimizer step."""
        z_in = batch["z_in"].to(self.device, self.dtype)
        context = self.telemetry.labels(batch["domain"]) if self.telemetry is not None else contextlib.nullcontext()
        with context:
            pred, router_loss = self.engine(z_in, **router_inputs(self.cfg.model.router.kind, batch["domain"]))
        mse = F.mse_loss(pred.float(), batch["z_out"].to(self.device, torch.float32))
        self.engine.backward(mse + router_loss.weighted(self.cfg.model))
        self.engine.step()
        return mse.item(), router_loss.balance.item(), router_loss.z.item()

    def _log_train(self, mse: float, aux: float, z: float, busy: float, steps: int) -> None:
        mse_avg, aux_avg, z_avg, busy_avg = _mean_over_world([mse, aux, z, busy], self.device)
        if not math.isfinite(mse_avg):
            self.nonfinite_losses += steps
        tokens_per_s = steps * self.layout.global_batch * self.cfg.model.tokens / busy_avg
        grad_norm = self.engine.get_global_grad_norm()
        self.tracker.log_metrics({
            "train/loss": mse_avg, "train/aux_loss": aux_avg, "train/z_loss": z_avg, "train/lr": self.engine.get_lr()[0],
            "train/grad_norm": float(grad_norm) if grad_norm is not None else None,
            "train/skipped_steps": self.skipped, "train/skipped_samples": self.stream.skipped,
            "train/nonfinite_loss_steps": self.nonfinite_losses, "perf/tokens_per_s": tokens_per_s,
            "perf/mfu": tokens_per_s * 3 * self.flops_fwd / (self.peak * self.info.world_size),
        }, self.step)
        if self.info.is_main:
            log.info("step %d loss %.5f aux %.4f %.0f tok/s", self.step, mse_avg, aux_avg, tokens_per_s)

    def _flush_routes(self) -> None:
        if self.telemetry is None:
            return
        self.telemetry.all_reduce()
        self.tracker.log_metrics(self.telemetry.metrics(), self.step)
        for callback in self.callbacks:
            callback.on_routes(self, self.telemetry, self.step)
        self.telemetry.reset()

    def save(self) -> str | None:
        """Checkpoint this step, unless it was skipped or the state is not finite (then None: `latest`
        keeps naming the last good one)."""
        if self.bad_in_row:
            log.warning("step %d: not checkpointed inside a non-finite streak (%d skipped in a row)",
                        self.step, self.bad_in_row)
            return None
        if not checkpoint.state_is_finite(self.engine):
            log.warning("step %d: not checkpointed, parameters or optimizer moments are not finite", self.step)
            return None
        layout = dict(self.layout_key, micro_batch=self.layout.micro_batch, grad_accum=self.layout.grad_accum)
        return checkpoint.save(self.engine, self.ckpt_dir, self.step, self.info.rank, layout,
                               self.stream.state_dict(), self.resolved)

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """val/<domain>/latent_mse over the val split (or train.val_batches per rank), without token dropping."""
        cfg, engine, device = self.cfg, self.engine, self.device
        sums_K = torch.zeros(len(self.domains), dtype=torch.float64, device=device)
        counts_K = torch.zeros_like(sums_K)
        engine.eval()
        with no_token_dropping(engine.module):
            batches = eval_batches(cfg.data, self.root, self.tokenizer_id, "val", cfg.train.val_micro_batch,
                                   self.info.rank, self.info.world_size)
            for i, batch in enumerate(batches):
                if cfg.train.val_batches and i >= cfg.train.val_batches:
                    break  # every rank yields the same number of batches, so all stop together
                pred, _ = engine(batch["z_in"].to(device, self.dtype), **router_inputs(cfg.model.router.kind, batch["domain"]))
                mse_B = (pred.float() - batch["z_out"].to(device)).pow(2).mean(dim=(1, 2, 3, 4)).double()
                valid_B = batch["valid"].to(device)
                domain_B = batch["domain"].to(device)
                sums_K.index_add_(0, domain_B[valid_B], mse_B[valid_B])
                counts_K.index_add_(0, domain_B[valid_B], torch.ones_like(mse_B[valid_B]))
        engine.train()
        dist.all_reduce(sums_K)
        dist.all_reduce(counts_K)
        return {f"val/{d}/latent_mse": (sums_K[k] / counts_K[k]).item()
                for k, d in enumerate(self.domains) if counts_K[k] > 0}


def pretrain(cfg: RunConfig, root: Path, run_name: str | None, info: DistInfo,
             callbacks: list[Callback] = ()) -> Path:
    """Train (or resume) one run; returns its run directory."""
    preempt.install()  # SIGUSR1 from slurm/*.sbatch: checkpoint at the next step, exit 75
    folder = run_dir_for(cfg, root, run_name)
    with RunLock(lock_file(folder, f"rank{info.rank}"), f"run {folder.name} (rank {info.rank})"):
        return Trainer(cfg, root, run_name, info, callbacks).fit()
