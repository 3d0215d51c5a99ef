"""Elastic checkpoints (shodh.train.reshard) on CPU: real DeepSpeed engines under the real launcher, gloo.

The converted checkpoints are loaded by DeepSpeed's own `load_checkpoint` on the new layout
(tests/reshard_probe.py), then compared value by value with the source and trained on.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shodh.errors import ConfigError
from shodh.io import sha256_file
from shodh.train import checkpoint, reshard
from test_pretrain import REPO, command, env, losses, pretrain

PROBE = str(REPO / "tests" / "reshard_probe.py")


def probe(nproc: int, ep: int, accum: int, run: Path, out: Path, max_steps: int, save_at: int) -> subprocess.Popen:
    cmd = command(nproc, [PROBE, str(ep), str(accum), str(run), str(out), str(max_steps), str(save_at)])
    return subprocess.Popen(cmd, env=env(), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(*procs: subprocess.Popen) -> None:
    for proc in procs:
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, output[-4000:]


def states(out: Path, kind: str) -> dict:
    """Merged per-parameter dumps of all ranks (global expert names); a parameter held by several
    ranks must agree among them."""
    merged: dict = {}
    for path in sorted(out.glob(f"{kind}-rank*.pt")):
        for name, value in torch.load(path, weights_only=True).items():
            if name.startswith("__"):
                merged.setdefault(name, []).append(value)
                continue
            if name in merged:
                assert all(torch.equal(merged[name][k], value[k]) for k in value), name
            merged[name] = value
    assert merged, f"no {kind} dumps in {out}"
    return merged


def assert_same_state(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    experts = [n for n in a if ".deepspeed_experts.3." in n]
    assert experts, "global expert 3 missing"
    for name in a:
        if name.startswith("__"):
            assert {json.dumps(v) for v in a[name]} == {json.dumps(v) for v in b[name]}, name  # step counts, lr
            continue
        for key in ("param", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a[name][key], b[name][key]), f"{name} {key}"
    assert any(a[n]["exp_avg"].abs().sum() > 0 for n in experts)  # moments that could have been lost


def run_losses(out: Path) -> dict[int, float]:
    return {int(k): v for k, v in json.loads((out / "losses-rank0.json").read_text()).items()}


def digests(folder: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def resharded(tmp_path_factory) -> Path:
    """A: 2 ranks ep=2, checkpoint at step 2, trained to 4. B: A's step 2 on 1 rank ep=1 (accumulation
    2 keeps the global batch), checkpoint at 3, to 4. C: A's step 2 on 2 ranks ep=1, to 4. D: B's
    step 3 (written by one rank) on 2 ranks ep=2, to 4."""
    t = tmp_path_factory.mktemp("reshard")
    finish(probe(2, 2, 1, t / "A", t / "outA", 4, 2))
    source = t / "A" / "checkpoints" / "step-000002"
    before = digests(source)
    reshard.reshard_run(t / "A", 1, 1, out=t / "B" / "checkpoints", keep_global_batch=True)
    reshard.reshard_run(t / "A", 2, 1, out=t / "C" / "checkpoints")
    assert digests(source) == before  # the source is only read
    finish(probe(1, 1, 2, t / "B", t / "outB", 4, 3), probe(2, 1, 1, t / "C", t / "outC", 4, 0))
    reshard.reshard_run(t / "B", 2, 2, out=t / "D" / "checkpoints", keep_global_batch=True)
    finish(probe(2, 2, 1, t / "D", t / "outD", 4, 0))
    return t


def test_two_ranks_ep2_to_one_rank_and_to_two_ranks_ep1(resharded):
    t = resharded
    saved = states(t / "outA", "saved")
    assert_same_state(saved, states(t / "outB", "loaded"))
    assert_same_state(saved, states(t / "outC", "loaded"))
    ref = run_losses(t / "outA")
    for name in ("outB", "outC"):
        got = run_losses(t / name)
        assert sorted(got) == [3, 4]
        for step in (3, 4):
            assert got[step] == pytest.approx(ref[step], abs=1e-5), (name, step)
    assert (t / "D" / "checkpoints" / "latest").read_text() == "step-000003-w2-ep2"  # --out: `latest` names it
    ckpt = t / "B" / "checkpoints"
    files = {p.name for p in (ckpt / "step-000002-w1-ep1").iterdir()}
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt" in files and "zero_pp_rank_1_mp_rank_00_optim_states.pt" not in files
    assert {f"layer_1_expert_{e}_mp_rank_00_model_states.pt" for e in range(4)} <= files
    meta = json.loads((ckpt / "step-000002-w1-ep1" / "meta.json").read_text())
    assert (meta["world_size"], meta["ep_size"], meta["grad_accum"]) == (1, 1, 2)


def test_one_rank_to_two_ranks_ep2(resharded):
    t = resharded
    assert_same_state(states(t / "outB", "saved"), states(t / "outD", "loaded"))
    got, ref = run_losses(t / "outD"), run_losses(t / "outA")
    assert sorted(got) == [4] and got[4] == pytest.approx(ref[4], abs=1e-5)


def test_layout_checks_name_what_must_change(resharded):
    run = resharded / "A"
    with pytest.raises(ConfigError, match="must divide model.num_experts=4, got 3"):
        reshard.reshard_run(run, 3, 3)
    with pytest.raises(ConfigError, match="must divide the world size 3, got 2"):
        reshard.reshard_run(run, 3, 2)
    with pytest.raises(ConfigError, match=r"global batch would change from 4 .* to 2 .*set train.grad_accum=2"):
        reshard.reshard_run(run, 1, 1)
    with pytest.raises(ConfigError, match="global batch 4 is not micro_batch 2 x world 4"):
        reshard.reshard_run(run, 4, 2, keep_global_batch=True)
    assert not any(p.name.endswith(("-w3-ep3", "-w3-ep2", "-w1-ep1", "-w4-ep2")) for p in (run / "checkpoints").iterdir())


def test_interrupted_conversion_leaves_nothing_to_resume(resharded, monkeypatch):
    run = resharded / "A"
    ckpt = run / "checkpoints"
    before = sorted(p.name for p in ckpt.iterdir())
    calls, real_save = [], torch.save

    def failing_save(obj, path):
        calls.append(path)
        if len(calls) == 2:
            raise OSError("No space left on device")
        real_save(obj, path)

    monkeypatch.setattr(reshard.torch, "save", failing_save)
    with pytest.raises(OSError):
        reshard.reshard_run(run, 2, 1)
    monkeypatch.undo()
    assert len(calls) == 2 and sorted(p.name for p in ckpt.iterdir()) == before  # no tag, no temporary folder

    # Killed halfway (SIGKILL after the first file): the partial folder is hidden, never a tag.
    script = ("import os, signal, sys, torch\nfrom pathlib import Path\nfrom shodh.train import reshard\n"
              "save = torch.save\ncalls = []\n"
              "def dying(obj, path):\n    calls.append(path)\n    if len(calls) == 2: os.kill(os.getpid(), signal.SIGKILL)\n"
              "    save(obj, path)\nreshard.torch.save = dying\nreshard.reshard_run(Path(sys.argv[1]), 2, 1)\n")
    proc = subprocess.run([sys.executable, "-c", script, str(run)], env=env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr[-2000:]
    leftovers = [p.name for p in ckpt.iterdir() if p.name not in before]
    assert len(leftovers) == 1 and leftovers[0].startswith(".tmp-step-000002-w2-ep1-")
    assert checkpoint.latest_tag(ckpt) == "step-000002" and checkpoint.checkpoint_tags(ckpt) == ["step-000002"]
    dst, _ = reshard.reshard_run(run, 2, 1)  # a new conversion replaces the debris
    assert sorted(p.name for p in ckpt.iterdir()) == sorted([*before, dst.name])
    assert checkpoint.checkpoint_tags(ckpt) == ["step-000002", "step-000002-w2-ep1"]
    shutil.rmtree(dst)


def test_elastic_resume_in_pretraining(root):
    """The trainer's train.resume=elastic: same world, other ep_size -> the data streams continue and
    the losses equal the uninterrupted run's; another world -> converted, fresh streams, trains on."""
    args = ["--run-name", "elastic", "train.max_steps=4", "train.ckpt_every=2", "tracking.mlflow=false"]
    pretrain(root, 2, *args, "model.ep_size=2")
    run = root / "runs" / "shodh" / "elastic"
    ckpt = run / "checkpoints"
    ref = losses(run)
    shutil.rmtree(ckpt / "step-000004")  # as if preempted right after the step-2 checkpoint
    (ckpt / "latest").write_text("step-000002")
    source = digests(ckpt / "step-000002")

    proc = pretrain(root, 2, *args, "model.ep_size=1", "train.resume=elastic")
    assert "resumed elastically at step 2 from step-000002-w2-ep1" in proc.stderr
    got = losses(run)
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(ref[step], abs=1e-5), step
    assert digests(ckpt / "step-000002") == source
    old = torch.load(ckpt / "step-000002" / "rank-00001.pt", weights_only=True)["loader"]
    assert torch.load(ckpt / "step-000002-w2-ep1" / "rank-00001.pt", weights_only=True)["loader"] == old

    refused = pretrain(root, 1, *args, "train.max_steps=5", "train.resume=elastic", check=False)
    assert refused.returncode == 2 and "train.keep_global_batch=true" in refused.stderr.strip().splitlines()[-1]
    proc = pretrain(root, 1, *args, "train.max_steps=5", "train.resume=elastic", "train.keep_global_batch=true")
    assert "resumed elastically at step 4 from step-000004-w1-ep1" in proc.stderr
    assert torch.load(ckpt / "step-000004-w1-ep1" / "rank-00000.pt", weights_only=True)["loader"] is None
    assert json.loads((run / "ds_config.json").read_text())["gradient_accumulation_steps"] == 2
    after = losses(run)
    assert sorted(after) == [1, 2, 3, 4, 5] and math.isfinite(after[5]) and after[5] < 2 * max(ref.values())


def test_loader_states_map_to_the_new_world(root):
    """Same world size: every rank's stream continues exactly; another world size: None (fresh streams)."""
    from shodh.config import load_config
    from shodh.data.loader import LatentStream, remap_states

    cfg = load_config("smoke").data
    tok = "test-tokenizer-0001"
    streams = [LatentStream(cfg, root, tok, "train", 2, rank=r, world_size=2, seed=5) for r in range(2)]
    iters = [iter(s) for s in streams]
    for it in iters:
        for _ in range(3):
            next(it)
    mapped = remap_states([s.state_dict() for s in streams], 2)
    expected = [[next(it) for _ in range(4)] for it in iters]
    for r in range(2):
        fresh = LatentStream(cfg, root, tok, "train", 2, rank=r, world_size=2, seed=5)
        fresh.load_state_dict(mapped[r])
        got = iter(fresh)
        for want in expected[r]:
            batch = next(got)
            assert torch.equal(batch["z_in"], want["z_in"]) and torch.equal(batch["domain"], want["domain"])
    assert remap_states([s.state_dict() for s in streams], 1) == [None]
    assert remap_states([s.state_dict() for s in streams], 4) == [None] * 4


def test_a_resume_that_extends_max_steps_runs_on_the_new_schedule():
    """The optimizer and scheduler states of a run trained 3 of max_steps=3, loaded into this launch's
    (max_steps=6) optimizer and LambdaLR as DeepSpeed's load_checkpoint does: resync_lr gives the new
    schedule's lr at step 3, not the old schedule's end-of-run value."""
    from shodh.schedule import lr_factor
    from shodh.train.checkpoint import resync_lr

    def build(total: int):
        param = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([param], lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, 1, total, 0.1))

    old_opt, old_sched = build(3)
    for _ in range(3):
        old_opt.step()
        old_sched.step()
    opt, sched = build(6)
    opt.load_state_dict(old_opt.state_dict())
    sched.load_state_dict(old_sched.state_dict())
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(3, 1, 3, 0.1))  # the stale value
    resync_lr(opt, sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(3, 1, 6, 0.1))
    assert lr_factor(3, 1, 6, 0.1) != pytest.approx(lr_factor(3, 1, 3, 0.1))
    assert sched.get_last_lr() == [opt.param_groups[0]["lr"]]
