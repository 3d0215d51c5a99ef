"""`shodh study` end to end on the tiny evaluation workspace (tests/eval_workspace.py: real tokenizer,
latents, pretraining, evaluation), plus its statistics on cases with exact answers."""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import eval_workspace
from shodh.cli import main
from shodh.study.stats import conflict_stats, negative_transfer, paired_bootstrap_ci, trajectory_of

# The whole smoke study, all arms, within 150 s on a 2-core CI box. Checked as CPU seconds of this
# process (all its threads): load-independent, and on 2 idle cores the wall time is at most that.
STUDY_BUDGET_S = 150
NAME = "smoke-study"
# 2 steps with a checkpoint at each, so the gradient probe sees training progress.
STUDY = [*eval_workspace.FAST, "train.max_steps=2", "train.ckpt_every=1", "eval.rollout_steps=1", f"study.name={NAME}"]
ARMS = ["moe_mixed", "dense_active_mixed", "dense_total_mixed", "moe_random", "moe_oracle",
        "moe_single_channel", "dense_single_channel", "moe_single_porous", "dense_single_porous"]


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """(root, study.json, CPU seconds of `shodh study`), run once for the module."""
    root = tmp_path_factory.mktemp("study")
    saved = os.environ.pop("MLFLOW_TRACKING_URI", None)  # the embedded store under root
    # DeepSpeed JIT-builds its CPU comm op once (minutes): share test_pretrain's cache.
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "shodh" / "torch_extensions"))
    try:
        eval_workspace.write_raw(root)
        for verb in ("train-tokenizer", "encode"):
            assert main([verb, "--profile", "smoke", "--root", str(root), *eval_workspace.FAST]) == 0
        cpu0, wall0 = time.process_time(), time.perf_counter()
        assert main(["study", "--profile", "smoke", "--root", str(root), "--seeds", "1", *STUDY]) == 0
        cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
        print(f"smoke study: {cpu:.0f} CPU s, {wall:.0f} wall s")
        yield root, json.loads((root / "runs" / "shodh" / NAME / "study.json").read_text()), cpu
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved


def _summary(root, arm):
    return json.loads((root / "runs" / "shodh" / f"{NAME}-{arm}-s0" / "eval" / "summary.json").read_text())


def _errors_RI(root, arm, domain, metric="vrmse"):
    return np.asarray([_summary(root, arm)["per_sample"]["test"][domain][metric]])


def test_smoke_study_within_budget(study):
    _, result, cpu = study
    assert result["arms"] == ARMS and result["seeds"] == 1
    assert cpu < STUDY_BUDGET_S, f"smoke study took {cpu:.0f} CPU s"


def test_child_runs_under_parent_in_mlflow(study):
    import mlflow

    root, _, _ = study
    client = mlflow.MlflowClient(f"sqlite:///{root.resolve() / 'mlflow.db'}")
    parent = (root / "runs" / "shodh" / NAME / "mlflow_run_id").read_text().strip()
    children = client.search_runs([client.get_experiment_by_name("shodh").experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"{NAME}-{a}-s0" for a in ARMS)
    assert all(r.data.tags["study"] == NAME for r in children)
    logged = {a.path for a in client.list_artifacts(parent, "study")}
    assert {"study/study.md", "study/study.json", "study/nt.png", "study/conflict.png", "study/routing.png"} <= logged
    nt_metric = client.get_metric_history(parent, "nt/vrmse/moe_mixed/channel/nt")
    assert nt_metric[0].value == pytest.approx(_nt(study, "vrmse", "moe_mixed", "channel")["nt"])


def _nt(study, metric, arm, domain):
    return study[1]["negative_transfer"][metric][arm][domain]


def test_nt_is_computed_from_the_runs_per_sample_errors(study):
    root, result, _ = study
    for metric in ("vrmse", "latent_mse"):
        for arm in ("moe_mixed", "dense_active_mixed", "dense_total_mixed", "moe_random", "moe_oracle"):
            for d in ("channel", "porous"):
                entry = result["negative_transfer"][metric][arm][d]
                ref = ("moe" if arm.startswith("moe") else "dense") + f"_single_{d}"
                assert entry["reference"] == ref
                e_arm, e_ref = _errors_RI(root, arm, d, metric), _errors_RI(root, ref, d, metric)
                assert entry["nt"] == pytest.approx(e_arm.mean() / e_ref.mean() - 1, rel=1e-12)
                assert entry["lo"] <= entry["nt"] <= entry["hi"] or math.isclose(entry["lo"], entry["hi"])
    # the per-sample errors are the ones evaluation averaged
    s = _summary(root, "moe_mixed")
    for d in ("channel", "porous"):
        for metric in ("vrmse", "latent_mse"):
            assert np.mean(s["per_sample"]["test"][d][metric]) == pytest.approx(s["metrics"][f"test/{d}/{metric}"])
        assert len(s["per_sample"]["test"][d]["ids"]) == result["test_samples"][d] == eval_workspace.FRAMES - 1


def test_nt_of_an_arm_against_itself_is_zero(study):
    root, _, _ = study
    e = _errors_RI(root, "moe_mixed", "porous")
    assert negative_transfer(e, e) == 0.0
    lo, hi = paired_bootstrap_ci(e, e, 500, 0.95)
    assert lo == 0.0 == hi


def test_worse_arm_gives_positive_nt():
    rng = np.random.default_rng(0)
    e_ref = rng.uniform(0.5, 1.5, size=(3, 40))
    e_worse = e_ref * 1.3
    assert negative_transfer(e_worse, e_ref) == pytest.approx(0.3)
    lo, hi = paired_bootstrap_ci(e_worse, e_ref, 1000, 0.95)
    assert 0 < lo <= 0.3 + 1e-12 and 0.3 - 1e-12 <= hi  # a constant ratio: every replicate is 0.3
    noisy = e_ref * 1.3 + rng.normal(0, 0.05, size=e_ref.shape)
    lo, hi = paired_bootstrap_ci(noisy, e_ref, 1000, 0.95)
    assert 0.2 < lo < negative_transfer(noisy, e_ref) < hi < 0.4
    lo, hi = paired_bootstrap_ci(e_ref / 1.3, e_ref, 1000, 0.95)  # a better arm: negative NT
    assert hi < 0


def test_clustered_bootstrap_resamples_trajectories_not_frames():
    """Four test trajectories of ten correlated frames: the arm is 40 % worse on two trajectories and
    equal on the others. Frames resampled as if independent give a narrow interval around NT = 0.2;
    resampling trajectories shows that the data cannot tell 0.0 from 0.4."""
    rng = np.random.default_rng(0)
    cluster_I = np.repeat(np.arange(4), 10)
    e_ref = np.ones((2, 40))
    e_arm = np.repeat([1.0, 1.4, 1.0, 1.4], 10)[None, :] * (1 + 0.01 * rng.standard_normal((2, 40)))
    nt = negative_transfer(e_arm, e_ref)
    f_lo, f_hi = paired_bootstrap_ci(e_arm, e_ref, 2000, 0.95)
    c_lo, c_hi = paired_bootstrap_ci(e_arm, e_ref, 2000, 0.95, cluster_I=cluster_I)
    assert c_lo <= nt <= c_hi and f_lo <= nt <= f_hi
    assert (c_hi - c_lo) > 2.5 * (f_hi - f_lo)
    assert c_lo < 0.05 and c_hi > 0.35
    assert paired_bootstrap_ci(e_ref, e_ref, 200, 0.95, cluster_I=cluster_I) == (0.0, 0.0)
    assert trajectory_of("porous_00012_00003") == "porous_00012"


def test_conflict_cosine_normalization():
    g = np.random.default_rng(1).normal(size=50)
    same = conflict_stats({"a": [g, g], "b": [g, g]})
    assert same["normalized"] == pytest.approx(1.0) and same["conflict_rate"] == 0.0
    opposed = conflict_stats({"a": [g, g], "b": [-g, -g]})
    assert opposed["normalized"] == pytest.approx(-1.0) and opposed["conflict_rate"] == 1.0
    # noisy same-domain batches: normalization divides the cross cosine by their agreement
    h = 0.5 * np.random.default_rng(2).normal(size=50)
    noisy = conflict_stats({"a": [g + h, g - h], "b": [g + h, g - h]})
    assert 0 < noisy["same_a"] < 1 and noisy["same_a"] == noisy["same_b"]
    assert noisy["normalized"] == pytest.approx(noisy["cross"] / noisy["same_a"])
    assert noisy["normalized"] > noisy["cross"]  # batch noise no longer counts as conflict


def test_conflict_of_a_real_gradient_with_itself_is_one():
    from shodh.model.config import ModelConfig
    from shodh.model.transformer import LatentTransformer
    from shodh.study.conflict import conflict_at, shared_gradients

    cfg = ModelConfig(dim=16, depth=2, heads=2, expert_dim=16, num_experts=2, moe_every=1)
    torch.manual_seed(0)
    model = LatentTransformer(cfg, 4)
    gen = torch.Generator().manual_seed(0)
    batch = {"z_in": torch.randn(2, 4, 16, 16, 16, generator=gen), "z_out": torch.randn(2, 4, 16, 16, 16, generator=gen),
             "domain": torch.zeros(2, dtype=torch.int64)}
    grads = shared_gradients(model, batch)
    assert set(grads) == {"shared", "attention", "embedding", "router", "shared_expert", "other"}  # no routed experts
    out = conflict_at(model, {"a": [batch, batch], "b": [batch, batch]})
    assert out["shared"]["normalized"] == pytest.approx(1.0, abs=1e-9) and out["shared"]["conflict_rate"] == 0


def test_conflict_over_training_for_moe_and_dense(study):
    _, result, _ = study
    for arm in ("moe_mixed", "dense_active_mixed"):
        points = result["conflict"][arm]
        assert [p["step"] for p in points] == [1, 2]
        for p in points:
            g = p["groups"]["shared"]
            assert -1 <= g["cross"] <= 1 and 0 <= g["conflict_rate"] <= 1
            assert g["normalized"] == pytest.approx(g["cross"] / math.sqrt(g["same_channel"] * g["same_porous"]))
    assert "router" in result["conflict"]["moe_mixed"][0]["groups"]
    assert "router" not in result["conflict"]["dense_active_mixed"][0]["groups"]


def test_router_controls_route_as_specified(study):
    _, result, _ = study
    oracle, hashed = result["routing"]["moe_oracle"], result["routing"]["moe_random"]
    for layer in ("layer0", "layer1"):
        # oracle: each domain owns one of the 2 experts; hash: both domains spread identically
        assert oracle[layer]["nmi"] == pytest.approx(1.0)
        assert oracle[layer]["p_expert_given_domain"] == {"channel": [1.0, 0.0], "porous": [0.0, 1.0]}
        assert hashed[layer]["nmi"] == pytest.approx(0.0, abs=1e-12)
        assert hashed[layer]["p_expert_given_domain"]["channel"] == hashed[layer]["p_expert_given_domain"]["porous"]
    assert set(result["routing"]) == {"moe_mixed", "moe_random", "moe_oracle", "moe_single_channel", "moe_single_porous"}


def test_domain_label_reaches_only_the_oracle_router():
    from shodh.errors import ShodhError
    from shodh.model.config import ModelConfig, RouterConfig
    from shodh.model.transformer import LatentTransformer

    z, domain = torch.randn(2, 4, 16, 16, 16), torch.tensor([0, 1])
    learned = LatentTransformer(ModelConfig(dim=16, depth=1, heads=2, expert_dim=16, num_experts=2, moe_every=1), 4)
    with pytest.raises(ShodhError, match="never a model input"):
        learned(z, domain_B=domain)
    oracle = LatentTransformer(ModelConfig(dim=16, depth=1, heads=2, expert_dim=16, num_experts=2, moe_every=1,
                                           router=RouterConfig(kind="oracle")), 4)
    with pytest.raises(ShodhError, match="required"):
        oracle(z)


def test_study_md_and_json_agree(study):
    root, result, _ = study
    md = (root / "runs" / "shodh" / NAME / "study.md").read_text()
    section = md.split("## Negative transfer, decoded VRMSE")[1].split("##")[0]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[3:-1]]
            for line in section.splitlines() if line.startswith("| ") and not line.startswith("| arm")}
    assert set(rows) == set(result["negative_transfer"]["vrmse"])
    for arm, cells in rows.items():
        for d, cell in zip(result["domains"], cells):
            e = result["negative_transfer"]["vrmse"][arm][d]
            nt, lo, hi = (float(x) for x in re.findall(r"[+-]\d+\.\d+", cell))
            assert (nt, lo, hi) == pytest.approx((e["nt"], e["lo"], e["hi"]), abs=5e-4)
    assert result["commands"]["study"] in md and "--report-only" in md
    assert "do and do not show" in md and "one seed" in md
    frames = md.split("## Clustered vs frame-level intervals")[1].split("##")[0]
    e = result["negative_transfer"]["vrmse"]["moe_mixed"]["channel"]
    assert f"[{e['frame_lo']:+.3f}, {e['frame_hi']:+.3f}]" in frames and f"[{e['lo']:+.3f}, {e['hi']:+.3f}]" in frames
    for png in ("nt.png", "conflict.png", "routing.png"):
        assert (root / "runs" / "shodh" / NAME / "plots" / png).read_bytes().startswith(b"\x89PNG")


def test_single_launch_and_report_only_reuse_finished_runs(study, capsys):
    root, result, _ = study
    args = ["study", "--profile", "smoke", "--root", str(root), "--seeds", "1", *STUDY]
    metrics = root / "runs" / "shodh" / f"{NAME}-moe_mixed-s0" / "metrics.jsonl"
    before = metrics.read_text()
    assert main([*args, "--arms", "moe_mixed", "--seed-index", "0"]) == 0  # finished: skipped, not retrained
    assert metrics.read_text() == before
    assert main([*args, "--report-only"]) == 0
    again = json.loads((root / "runs" / "shodh" / NAME / "study.json").read_text())
    assert {k: v for k, v in again.items() if k != "wall_s"} == {k: v for k, v in result.items() if k != "wall_s"}
    assert "negative transfer, vrmse" in capsys.readouterr().out
    assert main([*args, "--arms", "no_such_arm"]) == 2
    assert main([*args, "--seed-index", "1"]) == 2  # only 1 seed


def test_separate_launch_reproduces_the_sequential_arm(study):
    """An arm launched alone (a SLURM array task) gets the numbers it got inside the sequential study."""
    root, _, _ = study
    other = [a if not a.startswith("study.name=") else "study.name=alone" for a in STUDY]
    assert main(["study", "--profile", "smoke", "--root", str(root), "--seeds", "1", *other,
                 "--arms", "moe_oracle", "--seed-index", "0"]) == 0
    alone = json.loads((root / "runs" / "shodh" / "alone-moe_oracle-s0" / "eval" / "summary.json").read_text())
    assert alone["per_sample"] == _summary(root, "moe_oracle")["per_sample"]


def test_routing_table_is_one_seeds_and_nmi_the_mean():
    """Seeds settle domains on different experts: the table must not average them into uniform routing."""
    from shodh.study.report import _routing

    def summary(channel_expert: int, nmi: float) -> dict:
        m = {f"route/channel/layer1/expert{e}": float(e == channel_expert) for e in range(2)}
        m |= {f"route/porous/layer1/expert{e}": float(e != channel_expert) for e in range(2)}
        return {"metrics": {**m, "route/layer1/domain_mi": nmi}}

    r = _routing([summary(0, 1.0), summary(1, 0.8)])["layer1"]
    assert r["p_expert_given_domain"] == {"channel": [1.0, 0.0], "porous": [0.0, 1.0]}  # not [0.5, 0.5]
    assert r["nmi"] == pytest.approx(0.9) and r["nmi_per_seed"] == [1.0, 0.8]
