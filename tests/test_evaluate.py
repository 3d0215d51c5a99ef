"""`shodh evaluate` on a real (tiny) MoE and dense run: metrics, routing telemetry, artifacts,
MLflow logging and determinism. The runs come from conftest's `served_workspace`."""

import json
import math

import numpy as np
import pytest

from shodh.cli import main

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
DOMAINS = ("channel", "porous")


def _summary(run_dir):
    return json.loads((run_dir / "eval" / "summary.json").read_text())


def test_metrics_per_domain_and_split(served_workspace):
    _, runs, _ = served_workspace
    for name, run_dir in runs.items():
        m = _summary(run_dir)["metrics"]
        for split in ("val", "test"):
            for d in DOMAINS:
                for key in ("latent_mse", "decoded_mse", "vrmse", "nrmse", "spectrum_err", "spectrum_err_low",
                            "spectrum_err_mid", "spectrum_err_high", "ae_floor_vrmse", "divergence_max"):
                    assert math.isfinite(m[f"{split}/{d}/{key}"]) and m[f"{split}/{d}/{key}"] >= 0, (name, split, d, key)
                # decoded predictions are curls of a potential: divergence-free to float64 round-off
                assert m[f"{split}/{d}/divergence_rel"] < 1e-10
        for d in DOMAINS:  # 4 frames per trajectory: a rollout of exactly 3 steps
            assert [k for k in m if k.startswith(f"rollout/{d}/") and k.endswith("/latent_mse")] == [
                f"rollout/{d}/step{k}/latent_mse" for k in (1, 2, 3)]


def test_routing_fractions_sum_to_one(served_workspace):
    _, runs, _ = served_workspace
    m = _summary(runs["moe"])["metrics"]
    experts, layers = 2, 2  # eval_workspace: model.num_experts=2, depth=2, moe_every=1
    for d in DOMAINS:
        for l in range(layers):
            fractions = [m[f"route/{d}/layer{l}/expert{e}"] for e in range(experts)]
            assert sum(fractions) == pytest.approx(1.0, abs=1e-12)
            assert m[f"route/layer{l}/bifurcation/{d}"] == pytest.approx(max(fractions))
    for l in range(layers):
        assert 0 <= m[f"route/layer{l}/domain_mi"] <= 1 and m[f"route/layer{l}/drop_rate"] == 0
    dense = _summary(runs["dense"])["metrics"]
    assert not any(k.startswith("route/") for k in dense)  # dense runs get everything but routing


def test_artifacts_are_pngs_and_logged(served_workspace):
    import mlflow

    _, runs, url = served_workspace
    client = mlflow.MlflowClient(url)
    for name, run_dir in runs.items():
        expected = {"mse_curves.png", "rollout.png", "spectra.png", "slices.png"} | ({"routing.png"} if name == "moe" else set())
        for png in expected:
            data = (run_dir / "eval" / png).read_bytes()
            assert data.startswith(PNG_SIGNATURE) and len(data) > 5000, png
        assert not (run_dir / "eval" / "routing.png").exists() or name == "moe"
        run_id = (run_dir / "mlflow_run_id").read_text().strip()
        logged = {a.path for a in client.list_artifacts(run_id, "eval")}
        assert {f"eval/{p}" for p in expected | {"summary.json"}} <= logged
        # evaluation metrics landed in the pretraining run itself, at the checkpoint's step
        history = client.get_metric_history(run_id, "val/channel/vrmse")
        assert [h.step for h in history] == [_summary(run_dir)["step"]]
        last = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
        assert last["val/porous/vrmse"] == pytest.approx(_summary(run_dir)["metrics"]["val/porous/vrmse"])


def test_evaluation_is_deterministic(served_workspace, monkeypatch):
    import eval_workspace

    root, runs, _ = served_workspace
    first = _summary(runs["moe"])["metrics"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(["evaluate", "--profile", "smoke", "--root", str(root), "--run", str(runs["moe"]),
                 *eval_workspace.FAST, "tracking.mlflow=false"]) == 0
    second = _summary(runs["moe"])["metrics"]
    assert second.keys() == first.keys()
    assert all(second[k] == first[k] or (np.isnan(first[k]) and np.isnan(second[k])) for k in first)


def test_decoded_validation_inside_pretraining_matches_evaluate(served_workspace):
    import eval_workspace

    root, _, _ = served_workspace
    name = "moe-in-training"
    args = ["--profile", "smoke", "--root", str(root), *eval_workspace.FAST]
    assert main(["pretrain", *args, "eval.in_training=true", "--run-name", name]) == 0
    run_dir = root / "runs" / "shodh" / name
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {k: v for line in lines if line["step"] == 2 for k, v in line.items() if k.startswith("val/")}
    assert main(["evaluate", *args, "--run", str(run_dir)]) == 0
    m = _summary(run_dir)["metrics"]  # the same checkpoint (step 2), scored by `shodh evaluate`
    for d in DOMAINS:
        assert f"val/{d}/latent_mse" in logged  # still from the loader's validation
        for key in ("vrmse", "decoded_mse", "ae_floor_vrmse", "divergence_max"):
            assert logged[f"val/{d}/{key}"] == pytest.approx(m[f"val/{d}/{key}"], rel=1e-5, abs=1e-12), (d, key)
    # The decoded VRMSE against the step, plotted at the end (a PNG; MLflow gets the same file).
    assert (run_dir / "plots" / "val_vrmse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
