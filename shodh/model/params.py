"""Parameter groups of the latent transformer, tagged once where each module is built.

Every parameter carries `shodh_group`, one of GROUPS, set by the module that creates it (by module
type, never by parameter name), and every consumer reads the tag:
- `count_params` (total / active / router sizes, perf/mfu and run tags),
- `decays` (weight decay: matrices only, never the position tables),
- the study's gradient-conflict probe (which parameters every token passes through).
A renamed attribute therefore changes nothing; an untagged parameter is a bug and raises.
"""

from __future__ import annotations

from torch import nn

GROUPS = ("embedding", "position", "attention", "norm", "head", "dense_ffn", "shared_expert", "router", "expert")
ATTR = "shodh_group"


def tag(target: nn.Module | nn.Parameter, group: str) -> None:
    """Tag a parameter, or every parameter of a module, as `group`."""
    if group not in GROUPS:
        raise ValueError(f"unknown parameter group {group!r} (known: {GROUPS})")
    for p in [target] if isinstance(target, nn.Parameter) else target.parameters():
        setattr(p, ATTR, group)


def group_of(p: nn.Parameter, name: str = "?") -> str:
    group = getattr(p, ATTR, None)
    if group is None:
        raise RuntimeError(f"parameter {name} has no {ATTR} tag (tag it where its module is built)")
    return group


def decays(p: nn.Parameter, name: str = "?") -> bool:
    """Weight decay applies to matrices, except the learned position tables."""
    return p.ndim >= 2 and group_of(p, name) != "position"


def count_params(model: nn.Module) -> dict[str, int]:
    """total: every parameter of the full model (all E experts, not just this rank's);
    active: the ones one token passes through (one routed expert per MoE layer);
    router: gate weights plus the residual-MoE mixing coefficients (absent from dense models)."""
    cfg = model.cfg
    local = cfg.num_experts // cfg.ep_size  # this rank holds E / ep_size of the E experts
    total = active = router = 0
    for name, p in model.named_parameters():
        n, group = p.numel(), group_of(p, name)
        if group == "expert":
            total += n * cfg.num_experts // local
            active += n // local
            continue
        total += n
        active += n
        router += n if group == "router" else 0
    return {"total": total, "active": active, "router": router}
