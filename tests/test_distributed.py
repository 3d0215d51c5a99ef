"""The distributed environment: launcher and SLURM variables -> rank/world/master, array tasks,
and the node-layout checks of slurm/common.sh (run through bash with a faked SLURM environment).
The same derivation is exercised on a real two-node cluster in tests/test_slurm.py."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from shodh.distributed import DistInfo, array_task, dist_info, export_env, slurm_master, strip_local_rank
from shodh.errors import ShodhError

REPO = Path(__file__).resolve().parents[1]
COMMON = REPO / "slurm" / "common.sh"


def test_single_process_without_any_environment():
    info = dist_info({})
    assert info == DistInfo() and info.is_main and not info.distributed and info.source == "single"


def test_srun_task_variables_give_rank_world_and_master():
    env = {"SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NTASKS": "4",
           "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "123456"}
    info = dist_info(env)
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert info.master_addr == "gpu07"
    # A job-derived port: concurrent jobs that share a node must not collide.
    assert info.master_port == 20000 + 123456 % 20000
    assert info.source == "slurm" and not info.is_main and info.distributed


def test_slurm_master_and_port_can_be_pinned():
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n[1-2]",
           "MASTER_ADDR": "10.0.0.5", "MASTER_PORT": "31337"}
    info = dist_info(env)
    assert (info.master_addr, info.master_port, info.local_rank) == ("10.0.0.5", 31337, 0)


def test_launcher_variables_win_over_slurm():
    # slurm/pretrain.sbatch exports RANK etc. inside srun; deepspeed's launcher does too.
    env = {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "node1", "MASTER_PORT": "29600",
           "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NODELIST": "other1"}
    info = dist_info(env)
    assert (info.rank, info.world_size, info.master_addr, info.master_port, info.source) == (1, 2, "node1", 29600, "launcher")


def test_local_rank_argument_must_agree():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2"}
    assert dist_info(env, local_rank_arg=1).local_rank == 1
    with pytest.raises(ShodhError, match="disagrees"):
        dist_info(env, local_rank_arg=0)


@pytest.mark.parametrize("env, message", [
    ({"SLURM_PROCID": "2", "SLURM_NTASKS": "2"}, "outside world size 2"),
    ({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"}, "SLURM_PROCID='x' is not an integer"),
    ({"RANK": "0", "WORLD_SIZE": "two"}, "WORLD_SIZE='two' is not an integer"),
])
def test_bad_environment_is_a_clear_error(env, message):
    with pytest.raises(ShodhError, match=message):
        dist_info(env)


# Expected values are what `scontrol show hostnames NODELIST | head -1` prints (slurm 22.05).
@pytest.mark.parametrize("nodelist, first", [
    ("node1", "node1"),
    ("node[1-2]", "node1"),
    ("node[01-03,7],gpu1", "node01"),
    ("a1,b[2-3]", "a1"),
    ("n[3,1-2]", "n3"),
    ("rack[1-2]-node[3-4]", "rack1-node3"),
    ("gpu-[10-12]-ib", "gpu-10-ib"),
])
def test_slurm_master_is_the_first_host(nodelist, first):
    assert slurm_master(nodelist) == first


def test_export_env_round_trips(monkeypatch):
    # A private copy of the environment: delenv of an unset variable records nothing to undo, so
    # what export_env sets would leak into later tests (a WORLD_SIZE=2 makes them wait for rank 1).
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")})
    info = dist_info({"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2",
                      "SLURM_JOB_NODELIST": "node[1-2]", "SLURM_JOB_ID": "7"})
    export_env(info)
    assert dist_info(os.environ) == DistInfo(1, 0, 2, "node1", 20007, "launcher")


def test_strip_local_rank_both_spellings():
    assert strip_local_rank(["--local_rank=2", "--profile", "smoke"]) == (["--profile", "smoke"], 2)
    assert strip_local_rank(["--profile", "smoke", "--local-rank", "1", "a.b=1"]) == (["--profile", "smoke", "a.b=1"], 1)
    assert strip_local_rank(["--profile", "smoke"]) == (["--profile", "smoke"], None)


def test_array_task_index_and_count():
    assert array_task({}) == (0, 1)
    assert array_task({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "3"}) == (1, 3)


# ---- slurm/common.sh: the checks every sbatch script runs before srun --------------------------

def _bash(snippet: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    full = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/root"), **env}
    return subprocess.run(["bash", "-c", f"set -euo pipefail; source {COMMON}; {snippet}"],
                          env=full, capture_output=True, text=True, timeout=30)


needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="bash not installed")


@needs_bash
@pytest.mark.parametrize("spec, tasks", [("1(x2)", "1"), ("4", "4"), ("8,8", "8"), ("2(x3),2", "2")])
def test_uniform_tasks_per_node(spec, tasks):
    out = _bash(f"shodh_uniform_tasks_per_node '{spec}'", {})
    assert out.returncode == 0 and out.stdout.strip() == tasks, out.stderr


@needs_bash
@pytest.mark.parametrize("spec, message", [("2,1", "unevenly"), ("2(x2),1", "unevenly"), ("x", "unparsable")])
def test_uneven_or_bad_tasks_per_node_is_refused(spec, message):
    out = _bash(f"shodh_uniform_tasks_per_node '{spec}'", {})
    assert out.returncode != 0 and message in out.stderr


def _job_env(**extra: str) -> dict[str, str]:
    env = {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_NTASKS": "4",
           "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_JOB_NODELIST": "node[1-2]",
           # Pinned so the check does not need scontrol (the cluster test covers that path).
           "SHODH_MASTER_ADDR": "node1", "MASTER_ADDR": "stale-from-login-shell"}
    env.update(extra)
    return env


@needs_bash
def test_layout_exports_rendezvous_from_the_job():
    out = _bash('shodh_setup_layout 2; echo "$MASTER_ADDR $MASTER_PORT $SHODH_WORLD $DS_ACCELERATOR"', _job_env())
    assert out.returncode == 0, out.stderr
    addr, port, world, *accel = out.stdout.split()
    assert (addr, port, world) == ("node1", str(20000 + 4242 % 20000), "4")
    if shutil.which("nvidia-smi") is None:  # CPU nodes run DeepSpeed's CPU accelerator
        assert accel == ["cpu"]


@needs_bash
@pytest.mark.parametrize("extra, message", [
    ({"SLURM_TASKS_PER_NODE": "3,1"}, "unevenly"),
    ({"SLURM_NTASKS": "5"}, "2 nodes x 2 tasks per node != 5 tasks"),
    ({"SLURM_GPUS_ON_NODE": "4"}, "one task per GPU: --ntasks-per-node=2 but 4 GPUs per node"),
])
def test_bad_node_layout_fails_with_a_clear_message(extra, message):
    out = _bash("shodh_setup_layout 1", _job_env(**extra))
    assert out.returncode == 2 and message in out.stderr, out.stderr


@needs_bash
def test_ep_size_must_divide_the_world():
    out = _bash("shodh_setup_layout 8", _job_env())
    assert out.returncode == 2
    assert "model.ep_size=8 does not divide the world size 4 (2 nodes x 2 tasks per node)" in out.stderr


@needs_bash
def test_parse_args_resolves_root_and_keeps_flags(tmp_path):
    snippet = ('shodh_parse_args --profile smoke --root ws --run-name r1 model.ep_size=2 train.max_steps=4; '
               'printf "%s\\n" "$SHODH_PROFILE" "$SHODH_ROOT" "${SHODH_OVERRIDES[*]}" "${SHODH_STAGE_ARGS[*]}"')
    out = subprocess.run(["bash", "-c", f"set -euo pipefail; source {COMMON}; {snippet}"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    profile, root, overrides, stage = out.stdout.splitlines()
    assert (profile, root) == ("smoke", str(tmp_path / "ws"))
    assert overrides == "model.ep_size=2 train.max_steps=4"
    assert stage == f"--profile smoke --root {tmp_path / 'ws'} --run-name r1 model.ep_size=2 train.max_steps=4"


@needs_bash
def test_parse_args_refuses_stray_words_and_missing_profile_files(tmp_path):
    out = _bash(f"shodh_parse_args --root {tmp_path} stray", {})
    assert out.returncode == 2 and "unexpected argument 'stray'" in out.stderr
    out = _bash(f"shodh_parse_args --root {tmp_path} --profile {tmp_path}/nope.yaml", {})
    assert out.returncode == 2 and "--profile: file not found" in out.stderr


# ---- the preemption contract of shodh.pretrain with slurm/task.sh -------------------------------

def test_usr1_sets_the_preemption_flag_and_preempted_exits_75():
    import signal

    from shodh.train import preempt

    previous = signal.getsignal(signal.SIGUSR1)
    try:
        preempt.install()
        assert not preempt.requested()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert preempt.requested()  # single process: no collective needed
        with pytest.raises(SystemExit) as exc:
            raise preempt.Preempted(step=7)
        assert exc.value.code == preempt.PREEMPT_EXIT == 75 and exc.value.step == 7
    finally:
        signal.signal(signal.SIGUSR1, previous)


@needs_bash
def test_task_wrapper_turns_the_preempt_status_into_a_marker(tmp_path):
    env = {"SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_NTASKS": "2", "SHODH_PREEMPT_MARKS": str(tmp_path / "marks")}
    task = str(REPO / "slurm" / "task.sh")
    out = _bash(f'{task} bash -c \'echo "$RANK $LOCAL_RANK $WORLD_SIZE"; exit 75\'', env)
    # 0, so srun --kill-on-bad-exit does not kill ranks still writing their checkpoint part.
    assert out.returncode == 0 and out.stdout.split() == ["1", "0", "2"]
    assert (tmp_path / "marks" / "rank-1").exists()
    out = _bash(f"{task} bash -c 'exit 3'", env)
    assert out.returncode == 3  # any other status passes through
