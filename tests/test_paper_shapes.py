"""The paper profile's model, run for real: dim 512, depth 12, E = 16, ep_size 4 over 4 CPU processes
under the `deepspeed` launcher (gloo, ZeRO-2, expert-parallel all-to-all), 2 steps on synthetic latents,
a checkpoint, then a resume. Everything but the model's shape is shrunk to fit CI: micro batch 1,
activation checkpointing (which also runs the recompute's all-to-alls across expert-parallel ranks),
and small ZeRO buckets, so the four ranks stay within a few GiB together."""

from __future__ import annotations

import json
import math
import subprocess

from latent_fixture import make_latents
from test_pretrain import REPO, command, env, losses

PAPER_SHAPE = ["train.micro_batch=1", "train.warmup_steps=1", "train.log_every=1", "train.ckpt_every=2",
               "train.val_every=1000", "train.val_batches=1", "train.val_micro_batch=1", "train.route_every=1000",
               "train.peak_flops=1e11", "data.workers=0", "data.shuffle_buffer=8", "tracking.mlflow=false",
               "model.activation_checkpointing=true"]


def run(root, ds_config, *overrides) -> subprocess.CompletedProcess:
    target = ["--module", "shodh.pretrain", "--profile", "paper", "--root", str(root), "--run-name", "paper",
              *PAPER_SHAPE, f"train.ds_config={ds_config}", *overrides]
    proc = subprocess.run(command(4, target), env=env(), cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_paper_model_two_steps_on_four_ranks_then_resume(tmp_path):
    make_latents(tmp_path, channels=8, trajectories={"train": 4, "val": 4})
    ds = json.loads((REPO / "ds_configs" / "zero2_cpu_fp32.json").read_text())
    ds["zero_optimization"].update(reduce_bucket_size=5_000_000, allgather_bucket_size=5_000_000)
    ds_config = tmp_path / "zero2_small_buckets.json"
    ds_config.write_text(json.dumps(ds))

    proc = run(tmp_path, ds_config, "train.max_steps=2")
    out = proc.stdout + proc.stderr
    assert "dist_world_size=4" in out
    run_dir = tmp_path / "runs" / "shodh" / "paper"
    config = (run_dir / "config.yaml").read_text()
    for shape in ("dim: 512", "depth: 12", "num_experts: 16", "ep_size: 4", "patch: 2"):
        assert shape in config
    steps = losses(run_dir)
    assert sorted(steps) == [1, 2] and all(math.isfinite(v) for v in steps.values())
    ckpt = run_dir / "checkpoints"
    assert (ckpt / "latest").read_text() == "step-000002"
    assert json.loads((ckpt / "step-000002" / "meta.json").read_text())["ep_size"] == 4
    # Each expert-parallel rank saved its own 4 of the 16 experts of every MoE layer.
    assert len(list((ckpt / "step-000002").glob("layer_*_expert_*_mp_rank_00_model_states.pt"))) == 6 * 16

    proc = run(tmp_path, ds_config, "train.max_steps=3")
    assert "resumed fully at step 2" in proc.stderr
    after = losses(run_dir)
    assert sorted(after) == [1, 2, 3] and math.isfinite(after[3])
