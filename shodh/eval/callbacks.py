"""Evaluation plugged into pretraining: the callbacks `shodh pretrain` (and each study arm) hands
the Trainer. Training never imports evaluation; the CLI composes the two.

- `RoutingHeatmap`: at the last step, the domain x expert heatmap of the final routing interval
  (RUN_DIR/plots/routing.png) and NMI / expert purity per layer against the step
  (plots/routing_nmi.png), also to the MLflow run's `plots/` (MoE runs only).
- `DecodedValidation` (`eval.in_training`): at every validation, the val split's decoded one-step
  metrics (`val/<domain>/vrmse`, `decoded_mse`, `nrmse`, `spectrum_err*`, `divergence_*`, the
  autoencoder floor) for the model as it is now, and at the end their VRMSE against the step
  (plots/val_vrmse.png, also in MLflow). `val/<domain>/latent_mse` stays with the Trainer's own
  validation, so each metric has one source.
"""

from __future__ import annotations

from pathlib import Path

from shodh.config import RunConfig
from shodh.data.loader import read_manifest
from shodh.errors import DataError
from shodh.eval import plots
from shodh.eval.evaluate import Evaluator, evaluate_split, load_trajectories
from shodh.model.moe import no_token_dropping
from shodh.train.trainer import Callback, Trainer


class RoutingHeatmap(Callback):
    def on_routes(self, trainer: Trainer, telemetry, step: int) -> None:
        if trainer.info.is_main and step == trainer.cfg.train.max_steps:
            layers = [layer.layer for layer in telemetry.layers]
            path = plots.routing_heatmap(telemetry.counts_KLE, telemetry.domains, layers,
                                         trainer.run_dir / "plots" / "routing.png")
            trainer.tracker.log_artifact(path, "plots")
            # metrics.jsonl is written synchronously: it already holds this flush's route/* values.
            path = plots.routing_nmi(trainer.run_dir / "metrics.jsonl", layers, trainer.run_dir / "plots" / "routing_nmi.png")
            trainer.tracker.log_artifact(path, "plots")


class DecodedValidation(Callback):
    """Every rank runs it in lockstep on the same trajectories, as an MoE all-to-all needs."""

    def __init__(self, cfg: RunConfig, root: Path):
        self.cfg, self.root = cfg, Path(root)
        self._ready = None  # (evaluator, trajectories, domains)

    def on_start(self, trainer: Trainer) -> None:
        from shodh.tokenizer import load_tokenizer

        manifest = read_manifest(self.root, trainer.tokenizer_id)
        tok = load_tokenizer(self.root, device=trainer.device)
        if tok.id != trainer.tokenizer_id:
            raise DataError(f"{self.root / 'tokenizer'}: tokenizer {tok.id} is not the one these latents come from "
                            f"({trainer.tokenizer_id})")
        trajectories = load_trajectories(manifest, self.root, trainer.tokenizer_id, tok.grid, "val",
                                         self.cfg.eval.trajectories)
        ev = Evaluator(trainer.engine.module, tok, manifest["stats"], self.cfg.eval.batch, trainer.device,
                       trainer.dtype)
        self._ready = ev, trajectories, list(manifest["domains"])

    def on_validation(self, trainer: Trainer, step: int) -> dict[str, float]:
        ev, trajectories, domains = self._ready
        model = trainer.engine.module
        was_training = model.training
        model.eval()
        try:
            with no_token_dropping(model):
                metrics, _ = evaluate_split(ev, trajectories, "val", domains)
        finally:
            model.train(was_training)
        return {k: v for k, v in metrics.items() if not k.endswith("/latent_mse")}

    def on_end(self, trainer: Trainer, step: int) -> None:
        if trainer.info.is_main and self._ready is not None:
            path = plots.vrmse_curves(trainer.run_dir / "metrics.jsonl", self._ready[2],
                                      trainer.run_dir / "plots" / "val_vrmse.png")
            trainer.tracker.log_artifact(path, "plots")


def training_callbacks(cfg: RunConfig, root: Path) -> list[Callback]:
    """What pretraining gets from evaluation for this config."""
    callbacks: list[Callback] = [RoutingHeatmap()] if cfg.model.kind == "moe" else []
    if cfg.eval.in_training:
        callbacks.append(DecodedValidation(cfg, root))
    return callbacks
