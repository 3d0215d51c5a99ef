"""Evaluation configuration (section `eval`), free of torch imports so loading a config is cheap."""

from __future__ import annotations

from dataclasses import dataclass, field

from shodh.errors import check
from shodh.workspace import HELD_OUT


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["val", "test"])  # the first also gets rollouts and routing
    rollout_steps: int = 0  # autoregressive steps from each trajectory's first frame; 0 = as many as it has
    trajectories: int = 0  # per domain and split; 0 = all
    batch: int = 4  # latents per model forward and per decode
    threads: int = 0  # torch intra-op threads; 0 = torch's default
    in_training: bool = False  # decoded val metrics at every pretraining validation (needs ROOT/tokenizer)

    def validate(self) -> None:
        check(len(self.splits) >= 1 and all(s in HELD_OUT for s in self.splits)
              and len(set(self.splits)) == len(self.splits), "splits",
              f"must list distinct splits out of {list(HELD_OUT)}, got {self.splits}")
        for name in ("rollout_steps", "trajectories", "threads"):
            check(getattr(self, name) >= 0, name, f"must be >= 0, got {getattr(self, name)}")
        check(self.batch >= 1, "batch", f"must be >= 1, got {self.batch}")
