"""Routing telemetry report for evaluation: DESIGN.md's route/* metrics plus bifurcation.

Counting is `shodh.model.moe.RoutingTelemetry` (a forward hook on each `deepspeed_moe.gate`,
the same one pretraining uses), so training and evaluation report identical definitions. This
module adds what a per-domain report needs on top of the counts: P(expert | domain) tables and
"bifurcation", the fraction of a domain's tokens that go to its majority expert.

Shape legend: K domains, L MoE layers, E experts.
"""

from __future__ import annotations

import math

import torch

from shodh.model.moe import RoutingTelemetry


def expert_given_domain_KLE(counts_KLE: torch.Tensor) -> torch.Tensor:
    """P(expert | domain, layer) from token counts: [K, L, E] -> [K, L, E]; rows of a domain that
    has tokens sum to 1, rows without tokens are NaN."""
    total_KL1 = counts_KLE.sum(-1, keepdim=True)
    return torch.where(total_KL1 > 0, counts_KLE / total_KL1.clamp_min(1), math.nan)


def bifurcation_KL(counts_KLE: torch.Tensor) -> torch.Tensor:
    """Fraction of each domain's tokens on its majority expert, per layer: [K, L, E] -> [K, L].
    1 = the domain uses a single expert; 1/E = spread evenly. NaN where a domain has no tokens."""
    return expert_given_domain_KLE(counts_KLE).max(-1).values


def route_metrics(telemetry: RoutingTelemetry) -> dict[str, float]:
    """route/<domain>/layer<l>/expert<e>, route/layer<l>/{entropy, drop_rate, load_cv, domain_mi}
    (RoutingTelemetry.metrics) plus route/layer<l>/bifurcation/<domain>."""
    out = telemetry.metrics()
    bif_KL = bifurcation_KL(telemetry.counts_KLE)
    for l, layer in enumerate(telemetry.layers):
        for k, domain in enumerate(telemetry.domains):
            if not math.isnan(bif_KL[k, l].item()):
                out[f"route/layer{layer.layer}/bifurcation/{domain}"] = bif_KL[k, l].item()
    return out
