"""Study configuration (section `study`), free of torch imports so loading a config is cheap."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from shodh.errors import check
from shodh.workspace import check_name


@dataclass
class StudyConfig:
    name: str = ""  # parent run ROOT/runs/<experiment>/<name>/, children <name>-<arm>-s<i>; empty: <profile>-study
    seeds: int = 3  # seed i trains every arm with seed = `seed` + i (arms are paired by seed)
    arms: list[str] = field(default_factory=list)  # empty: every arm (see shodh.study.arms)
    split: Literal["val", "test"] = "test"  # where E_d (VRMSE, latent MSE) is measured
    bootstrap: int = 2000  # paired bootstrap replicates
    level: float = 0.95  # confidence level of the bootstrap intervals
    conflict_batches: int = 4  # held-out (val) batches per domain at each checkpoint
    conflict_batch: int = 2  # samples per held-out batch

    def validate(self) -> None:
        if self.name:  # empty: <profile>-study
            check_name(self.name, "name")  # a directory under ROOT/runs/<experiment>/
        check(self.seeds >= 1, "seeds", f"must be >= 1, got {self.seeds}")
        check(len(set(self.arms)) == len(self.arms), "arms", f"lists an arm twice: {self.arms}")
        check(self.bootstrap >= 1, "bootstrap", f"must be >= 1, got {self.bootstrap}")
        check(0 < self.level < 1, "level", f"must be in (0, 1), got {self.level}")
        check(self.conflict_batches >= 2, "conflict_batches",
              f"must be >= 2 (the same-domain cosine needs two batches), got {self.conflict_batches}")
        check(self.conflict_batch >= 1, "conflict_batch", f"must be >= 1, got {self.conflict_batch}")
