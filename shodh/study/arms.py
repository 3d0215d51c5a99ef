"""The study's arms: which model, router and data mix each one trains, and its single-domain reference.

Every arm starts from the same resolved config (tokenizer, latents, schedule, hyperparameters,
train.max_steps); an arm changes only model.kind, model.router and the data mix. Token budget
per domain: a single-domain arm trains the same number of steps with the micro batch scaled by
that domain's mixing weight (0.5 for two equal domains), so per step and in total it sees as
many of that domain's tokens as the mixed arm draws in expectation (the mixed stream draws each
item's domain at random, so its count is binomial around that), under the identical lr schedule.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from shodh.config import RunConfig, validate_tree
from shodh.errors import ConfigError
from shodh.study.config import StudyConfig
from shodh.workspace import run_dir, study_child_name


def study_name(cfg: RunConfig) -> str:
    return cfg.study.name or f"{cfg.profile}-study"


def study_dir(cfg: RunConfig, root: Path) -> Path:
    """The study's parent run: ROOT/runs/<experiment>/<study name>/."""
    return run_dir(root, cfg.tracking.experiment, study_name(cfg))


def child_name(cfg: RunConfig, arm: str, seed_index: int) -> str:
    return study_child_name(study_name(cfg), arm, seed_index)


def child_dir(cfg: RunConfig, root: Path, arm: str, seed_index: int) -> Path:
    """One arm x seed's ordinary run directory, a sibling of the study's."""
    return run_dir(root, cfg.tracking.experiment, child_name(cfg, arm, seed_index))


# Router variants (opt-in: `shodh study --arms moe_mixed,moe_bias,...`), model.router fields each sets.
ROUTER_VARIANTS = {
    "moe_global": (("balance", "global"),),
    "moe_bias": (("balance", "bias"),),
    "moe_nobalance": (("balance", "none"),),
    "moe_zloss": (("z_loss", 1e-3),),  # ST-MoE's coefficient
    "moe_sample": (("scope", "sample"),),
    "moe_bias_sample": (("balance", "bias"), ("scope", "sample")),
}
FIXED = (("balance", "switch"), ("z_loss", 0.0), ("scope", "token"))  # what a fixed (hash/oracle) router allows


@dataclass(frozen=True)
class Arm:
    name: str
    kind: str  # model.kind
    router: tuple = ()  # (field, value) pairs set on model.router; the rest is the base config's
    domain: str | None = None  # the only domain it trains on; None = the configured mix
    optional: bool = False  # run only when named in study.arms

    @property
    def family(self) -> str:
        """Single-domain arms an arm is compared with: moe_single_<d> or dense_single_<d>."""
        return "moe" if self.kind == "moe" else "dense"

    def reference(self, domain: str) -> str:
        return f"{self.family}_single_{domain}"


def all_arms(domains: list[str]) -> list[Arm]:
    """Mixed arms, then the controls, then the single-domain references, in report order."""
    arms = [Arm("moe_mixed", "moe"),
            Arm("dense_active_mixed", "dense_active"),
            Arm("dense_total_mixed", "dense_total"),
            Arm("moe_random", "moe", (("kind", "hash"), *FIXED)),
            Arm("moe_oracle", "moe", (("kind", "oracle"), ("domains", len(domains)), *FIXED))]
    arms += [Arm(name, "moe", fields, optional=True) for name, fields in ROUTER_VARIANTS.items()]
    for d in domains:
        arms += [Arm(f"moe_single_{d}", "moe", domain=d), Arm(f"dense_single_{d}", "dense_active", domain=d)]
    return arms


def select(names: list[str], domains: list[str]) -> list[Arm]:
    """The named arms (when empty: every arm but the optional router variants), in report order;
    unknown names are a ConfigError."""
    known = {a.name: a for a in all_arms(domains)}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"study.arms: unknown arm(s) {unknown} (known: {', '.join(known)})")
    return [a for a in known.values() if (a.name in names if names else not a.optional)]


def arm_config(base: RunConfig, arm: Arm, domains: list[str], seed_index: int) -> RunConfig:
    """The resolved config one arm x seed trains with."""
    weights = {d: w for d, w in base.data.weights.items() if w > 0}
    router = dataclasses.replace(base.model.router, **dict(arm.router)) if arm.router else base.model.router
    model = dataclasses.replace(base.model, kind=arm.kind, router=router)
    data, train = base.data, base.train
    if arm.domain is not None:
        share = weights.get(arm.domain, 0.0) / sum(weights.values())
        micro = base.train.micro_batch * share
        if share == 0 or abs(micro - round(micro)) > 1e-9:
            raise ConfigError(f"train.micro_batch: {base.train.micro_batch} x the '{arm.domain}' share {share:g} of "
                              f"data.weights must be a whole number >= 1 for arm {arm.name} (equal token budget per "
                              f"domain); use a micro batch divisible by the number of domains")
        data = dataclasses.replace(base.data, weights={arm.domain: 1.0})
        train = dataclasses.replace(base.train, micro_batch=int(round(micro)), global_batch=0)
    # A child's config must not depend on how the study was launched (--seeds, --arms, one seed index):
    # its `study` section keeps only the name, so relaunches find their finished runs.
    cfg = dataclasses.replace(base, seed=base.seed + seed_index, model=model, data=data, train=train,
                              study=StudyConfig(name=base.study.name))
    validate_tree(cfg)
    return cfg
