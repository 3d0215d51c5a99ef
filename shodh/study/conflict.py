"""Gradient conflict between domains on the shared parameters, measured at a run's checkpoints.

At every saved checkpoint the model (weights only) gets the training objective's gradient
(latent MSE + model.aux_loss_coef * aux) on held-out val batches of each domain, in eval mode
without token dropping, so the gradients are deterministic. Only parameters every token passes
through count ("shared": attention, embeddings and position tables, router and residual-MoE
coefficient, shared expert, norms, head, and the dense FFN of dense blocks); routed experts are
excluded, since a token only reaches its own. The held-out batches come from the study's base
data config, so every arm and seed is probed on the same samples.

Shape legend (the project's): B batch, C latent channels, V parameters of a flat gradient.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from shodh.config import RunConfig
from shodh.data.loader import eval_batches
from shodh.errors import ShodhError
from shodh.model import params
from shodh.study.stats import conflict_stats
from shodh.train.checkpoint import checkpoint_tags, load_for_inference

# Reported groups of shared parameters, from the model's parameter tags (shodh.model.params);
# the remaining shared tags (norms, head) are "other".
REPORTED = {"embedding": "embedding", "position": "embedding", "attention": "attention", "router": "router",
            "shared_expert": "shared_expert", "dense_ffn": "dense_ffn"}


def group_of(p: torch.nn.Parameter, name: str = "?") -> str | None:
    """The shared group of a parameter, or None for a routed expert (not shared)."""
    tag = params.group_of(p, name)
    return None if tag == "expert" else REPORTED.get(tag, "other")


def held_out_batches(cfg: RunConfig, root: Path, tokenizer_id: str, domains: list[str]) -> dict[str, list[dict]]:
    """study.conflict_batches disjoint batches of study.conflict_batch val pairs per domain, the
    first ones in manifest order: {domain: [{"z_in", "z_out": [B, C, 16, 16, 16], "domain": [B]}]}."""
    n, b = cfg.study.conflict_batches, cfg.study.conflict_batch
    pairs: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {k: [] for k in range(len(domains))}
    for batch in eval_batches(cfg.data, root, tokenizer_id, "val", 16, 0, 1):
        for z_in, z_out, k, ok in zip(batch["z_in"], batch["z_out"], batch["domain"].tolist(), batch["valid"].tolist()):
            if ok and len(pairs[k]) < n * b:
                pairs[k].append((z_in, z_out))
    out = {}
    for k, d in enumerate(domains):
        if len(pairs[k]) < n * b:
            raise ShodhError(f"study.conflict_batches x study.conflict_batch = {n} x {b} val pairs of '{d}' needed "
                             f"for the gradient-conflict probe, the val split has {len(pairs[k])}; lower them")
        out[d] = [{"z_in": torch.stack([p[0] for p in pairs[k][i * b:(i + 1) * b]]),
                   "z_out": torch.stack([p[1] for p in pairs[k][i * b:(i + 1) * b]]),
                   "domain": torch.full((b,), k, dtype=torch.int64)} for i in range(n)]
    return out


def shared_gradients(model: torch.nn.Module, batch: dict) -> dict[str, np.ndarray]:
    """Flat float64 gradient [V] of the training objective on one batch, per shared group and "shared"
    (all groups together). A group the loss does not reach (a fixed router's gate) is all zeros."""
    from shodh.model.moe import no_token_dropping, router_inputs

    named = [(n, p, group_of(p, n)) for n, p in model.named_parameters() if group_of(p, n) is not None]
    model.eval()
    with no_token_dropping(model):
        pred, router_loss = model(batch["z_in"], **router_inputs(model.cfg.router.kind, batch["domain"]))
        loss = F.mse_loss(pred.float(), batch["z_out"]) + router_loss.weighted(model.cfg)
    grads = torch.autograd.grad(loss, [p for _, p, _ in named], allow_unused=True)
    by_group: dict[str, list[torch.Tensor]] = {}
    for (_, p, group), g in zip(named, grads):
        by_group.setdefault(group, []).append((torch.zeros_like(p) if g is None else g).detach().double().flatten())
    out = {group: torch.cat(parts).numpy() for group, parts in by_group.items()}
    out["shared"] = np.concatenate([out[g] for g in sorted(by_group)])
    return out


def conflict_at(model: torch.nn.Module, batches: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """conflict_stats per shared group (and "shared") for one model: {group: {cross, normalized, ...}}."""
    per_domain = {d: [shared_gradients(model, b) for b in bs] for d, bs in batches.items()}
    groups = next(iter(per_domain.values()))[0].keys()
    return {g: conflict_stats({d: [grads[g] for grads in per_domain[d]] for d in per_domain}) for g in groups}


def run_conflict(cfg: RunConfig, root: Path, run_dir: Path, channels: int, batches: dict[str, list[dict]]) -> list[dict]:
    """Gradient conflict at every checkpoint of a run, in step order: [{"step", "groups": {...}}]."""
    out = []
    for tag in checkpoint_tags(run_dir / "checkpoints"):
        model, step, _, _ = load_for_inference(cfg, run_dir, channels, tag)
        # Gradients in float32 on the CPU, whatever precision and device the run trained in.
        model = model.float().cpu()
        out.append({"step": step, "groups": conflict_at(model, batches)})
    return out
