"""slurm/*.sbatch on a real SLURM cluster: slurmctld + two slurmd emulating node1 and node2 on
this machine (.ci/slurm_cluster.sh). Needs root and Debian's slurm-wlm + munge
(`bash .ci/slurm_cluster.sh install`); without them the tests skip, except under CI=true where
a skip would hide a broken setup, so they fail instead.

The cluster has no accounting database: a job's final state and exit code come from
`scontrol show job` (the harness keeps finished jobs for an hour with MinJobAge)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import skip_unless_ci

REPO = Path(__file__).resolve().parents[1]
HARNESS = REPO / ".ci" / "slurm_cluster.sh"
NEEDED = ("sbatch", "squeue", "scontrol", "scancel", "srun", "slurmctld", "slurmd", "munged")
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
            "PREEMPTED"}

pytestmark = pytest.mark.slow


def _which(name: str) -> str | None:
    # Daemons live in /usr/sbin, which a non-login PATH may lack.
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")


def _unavailable() -> str | None:
    missing = [name for name in NEEDED if _which(name) is None]
    if missing:
        return f"SLURM is not installed ({', '.join(missing)} missing): run `sudo bash .ci/slurm_cluster.sh install`"
    if os.geteuid() != 0:
        return "the localhost SLURM cluster needs root (it starts slurmctld/slurmd and edits /etc/hosts)"
    return None


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> dict[str, str]:
    """Starts the two-node cluster once per session; yields the environment for client commands."""
    reason = _unavailable()
    if reason:
        skip_unless_ci(reason)
    state = tmp_path_factory.mktemp("slurm")
    harness_env = {**os.environ, "SHODH_SLURM_DIR": str(state),
                   "PATH": os.environ["PATH"] + ":/usr/sbin:/sbin"}
    start = subprocess.run(["bash", str(HARNESS), "start"], env=harness_env, capture_output=True, text=True, timeout=120)
    try:
        assert start.returncode == 0, f"cluster did not start:\n{start.stdout}\n{start.stderr}"
        # PATH stays as the rest of the suite has it: torch JIT-builds with the first `ninja` on
        # PATH, and two ninja versions sharing one extension cache rebuild it for each other.
        env = {**harness_env, "SLURM_CONF": str(state / "slurm.conf"),
               "SHODH_PYTHON": sys.executable, "SHODH_HOME": str(REPO),
               # Two "nodes" share this machine's cores: one thread per rank.
               "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        # The same JIT-extension cache as tests/test_pretrain.py, so its DeepSpeed op build is reused.
        env.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "shodh" / "torch_extensions"))
        for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MLFLOW_TRACKING_URI"):
            env.pop(name, None)
        yield env
    finally:
        stop = subprocess.run(["bash", str(HARNESS), "stop"], env=harness_env, capture_output=True, text=True, timeout=120)
        if stop.returncode != 0:
            print(stop.stderr, file=sys.stderr)


# ---- talking to the cluster -------------------------------------------------------------------

def sbatch(env: dict[str, str], *args: str, cwd: Path) -> int:
    out = subprocess.run(["sbatch", "--parsable", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"sbatch {' '.join(args)} failed: {out.stderr}"
    return int(out.stdout.strip().split(";")[0])


def job_info(env: dict[str, str], job: int) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], env=env, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    fields: dict[str, str] = {}
    for word in out.stdout.split():
        key, sep, value = word.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def wait_for(env: dict[str, str], job: int, timeout: float, log: Path | None = None) -> dict[str, str]:
    """Polls until the job reaches a final state (squeue-speed, not sbatch --wait's slow polling)."""
    deadline = time.monotonic() + timeout
    while True:
        info = job_info(env, job)
        if info["JobState"] in TERMINAL:
            return info
        if time.monotonic() > deadline:
            subprocess.run(["scancel", str(job)], env=env, timeout=30)
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            pytest.fail(f"job {job} still {info['JobState']} after {timeout:.0f} s\n{tail}")
        time.sleep(0.5)


def wait_until(predicate, timeout: float, what: str, details=lambda: "") -> None:
    """Poll `predicate` until true; on timeout fail with `details()` (job state, log tail)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{details()}")
        time.sleep(0.3)


def queue_size(env: dict[str, str]) -> int:
    out = subprocess.run(["squeue", "-h", "-o", "%i"], env=env, capture_output=True, text=True, timeout=30)
    return len(out.stdout.split())


# ---- the generic machinery: env per task, preemption and requeue -------------------------------

# A stand-in for a training module with the preemption contract of slurm/common.sh: it records
# what it sees, steps slowly, and on SIGUSR1 saves its step and exits with status 75.
FAKE_TRAINER = r'''
import json, os, signal, sys, time
from pathlib import Path
from shodh.distributed import dist_info

out, steps = Path(sys.argv[1]), int(sys.argv[2])
info = dist_info()
stop = False
def on_usr1(signum, frame):
    global stop
    stop = True
signal.signal(signal.SIGUSR1, on_usr1)
ckpt = out / f"ckpt-{info.rank}"
start = int(ckpt.read_text()) if ckpt.exists() else 0
record = {"rank": info.rank, "local_rank": info.local_rank, "world": info.world_size,
          "master": f"{info.master_addr}:{info.master_port}", "source": info.source, "start": start,
          "node": os.environ["SLURMD_NODENAME"], "restart": int(os.environ.get("SLURM_RESTART_COUNT", "0")),
          "env": {k: os.environ[k] for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}}
with open(out / f"log-{info.rank}.jsonl", "a") as f:
    f.write(json.dumps(record) + "\n")
(out / f"ready-{info.rank}-{record['restart']}").touch()
for step in range(start, steps):
    if stop:
        ckpt.write_text(str(step))
        sys.exit(75)
    time.sleep(0.25)
ckpt.write_text(str(steps))
'''

GENERIC_SBATCH = """#!/usr/bin/env bash
#SBATCH --requeue
#SBATCH --open-mode=append
set -euo pipefail
source "$SHODH_HOME/slurm/common.sh"
SHODH_STAGE=generic
shodh_setup_python
shodh_setup_layout 2
shodh_run_tasks "$SHODH_PYTHON" {trainer} {out} {steps}
"""


def _generic_job(tmp_path: Path, steps: int) -> tuple[Path, Path]:
    out = tmp_path / "out"
    out.mkdir()
    trainer = tmp_path / "trainer.py"
    trainer.write_text(FAKE_TRAINER)
    script = tmp_path / "generic.sbatch"
    script.write_text(GENERIC_SBATCH.format(trainer=trainer, out=out, steps=steps))
    return script, out


def _records(out: Path, rank: int) -> list[dict]:
    return [json.loads(line) for line in (out / f"log-{rank}.jsonl").read_text().splitlines()]


def test_tasks_see_rank_world_and_master_on_two_nodes(cluster, tmp_path):
    script, out = _generic_job(tmp_path, steps=1)
    log = tmp_path / "job.out"
    job = sbatch(cluster, "--nodes=2", "--ntasks-per-node=1", f"--output={log}", str(script), cwd=tmp_path)
    info = wait_for(cluster, job, 90, log)
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), log.read_text()
    first = subprocess.run(["scontrol", "show", "hostnames", info["NodeList"]], env=cluster,
                           capture_output=True, text=True).stdout.split()[0]
    port = str(20000 + job % 20000)
    seen = {}
    for rank in (0, 1):
        (rec,) = _records(out, rank)
        assert rec["env"] == {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
                              "MASTER_ADDR": first, "MASTER_PORT": port}
        assert (rec["world"], rec["local_rank"], rec["master"]) == (2, 0, f"{first}:{port}")
        seen[rank] = rec["node"]
    assert sorted(seen.values()) == ["node1", "node2"]  # one task on each emulated node
    assert seen[0] == first  # rank 0 lives on the master host


# ---- validation: mistakes fail at submission or in the job's first seconds ----------------------

def test_bad_requests_are_refused_at_submission(cluster, tmp_path):
    before = queue_size(cluster)
    cases = [
        (["--profile", "nope", "--root", str(tmp_path / "ws")], "unknown profile 'nope'"),
        (["--nodes=3", "--", "--profile", "smoke", "--root", str(tmp_path / "ws")], "slurm refuses this request"),
        (["--profile", "smoke", "--root", str(tmp_path / "ws"), "model.ep_size=4"],
         "model.ep_size=4 does not divide the world size 2 (2 nodes x 1 tasks per node)"),
        (["--profile", "smoke", "--root", str(tmp_path / "ws"), "train.micro_batch=10000000"],
         "exceeds the device's 80 GiB (--device-memory-gib); largest term activations"),  # shodh plan
    ]
    for args, message in cases:
        run = subprocess.run([str(REPO / "slurm" / "pretrain.sbatch"), *args], env=cluster, cwd=tmp_path,
                             capture_output=True, text=True, timeout=180)  # `shodh plan` imports DeepSpeed
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr)
    assert queue_size(cluster) == before  # nothing was submitted


def test_bad_layout_or_profile_fails_the_job_before_srun(cluster, tmp_path):
    jobs = {}
    for name, opts, args, message in [
        ("uneven", ["--nodes=2", "--ntasks=3", "--ntasks-per-node=2"], ["--profile", "smoke"], "bad node layout: "),
        ("profile", [], ["--profile", "nope"], "unknown profile 'nope'"),
    ]:
        log = tmp_path / f"{name}.out"
        job = sbatch(cluster, *opts, f"--output={log}", str(REPO / "slurm" / "pretrain.sbatch"), *args,
                     "--root", str(tmp_path / "ws"), cwd=tmp_path)
        jobs[name] = (job, log, message)
    for job, log, message in jobs.values():
        info = wait_for(cluster, job, 60, log)
        text = log.read_text()
        assert (info["JobState"], info["ExitCode"]) == ("FAILED", "2:0"), text
        assert message in text and "srun" not in text, text


# ---- the data stages: simulate (array + merge) -> train_tokenizer -> encode, chained ------------

# A cheap channel-only smoke dataset: 4 trajectories of 2 frames after a 1 s spin-up, and a
# 10-step tokenizer. The same overrides go to every stage (the data identity must agree).
TINY = ["sim.domains=[channel]", "sim.frames=2", "sim.channel.spinup_time=1", "sim.channel.settle_time=0.2",
        "sim.channel.decorrelation_time=0.2", "sim.channel.frame_interval=0.2", "tokenizer.steps=10",
        "tokenizer.checkpoint_every=5", "tokenizer.window=2"]


def test_data_stages_array_merge_tokenizer_encode(cluster, tmp_path):
    root = tmp_path / "ws"
    stage_args = ["--profile", "smoke", "--root", str(root), *TINY]
    env = {**cluster, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db"}
    array = sbatch(env, "--array=0-1", f"--output={tmp_path}/sim-%a.out", str(REPO / "slurm" / "simulate.sbatch"),
                   *stage_args, cwd=tmp_path)
    first = tmp_path / "sim-0.out"
    wait_until(lambda: first.exists() and "merge job " in first.read_text(), 120, "task 0 to submit the merge job")
    merge = int(first.read_text().split("merge job ")[1].split()[0])
    # Tokenizer and encoder run data parallel across both nodes, each after the previous stage.
    tok = sbatch(env, f"--dependency=afterok:{merge}", "--nodes=2", "--ntasks-per-node=1",
                 f"--output={tmp_path}/tok.out", str(REPO / "slurm" / "train_tokenizer.sbatch"), *stage_args, cwd=tmp_path)
    enc = sbatch(env, f"--dependency=afterok:{tok}", "--nodes=2", "--ntasks-per-node=1",
                 f"--output={tmp_path}/enc.out", str(REPO / "slurm" / "encode.sbatch"), *stage_args, cwd=tmp_path)

    info = wait_for(cluster, enc, 300, tmp_path / "enc.out")
    logs = {p.name: p.read_text() for p in tmp_path.glob("*.out")}
    merge_log = logs.get(f"shodh-simulate-merge-{merge}.out", "")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), "\n".join(v[-1500:] for v in logs.values())
    out = subprocess.run(["scontrol", "show", "job", "-o", str(array)], env=cluster, capture_output=True, text=True)
    tasks = {}
    for line in out.stdout.splitlines():  # one line per array task
        fields = dict(w.partition("=")[::2] for w in line.split() if "=" in w)
        tasks[fields["ArrayTaskId"]] = (fields["JobState"], fields["ExitCode"])
    assert tasks == {"0": ("COMPLETED", "0:0"), "1": ("COMPLETED", "0:0")}
    for task in (0, 1):  # each task did its round-robin share: 2 of the 4 trajectories
        assert "generated 2 trajectories" in logs[f"sim-{task}.out"], logs[f"sim-{task}.out"][-2000:]
    assert "manifest:" in merge_log and len(json.loads((root / "raw" / "manifest.json").read_text())["shards"]) == 4
    for job in (merge, tok):
        assert job_info(cluster, job)["JobState"] == "COMPLETED"
    tokenizer_id = json.loads((root / "tokenizer" / "tokenizer.json").read_text())["id"]
    assert "2 nodes x 1 tasks" in logs["tok.out"] and "2 nodes x 1 tasks" in logs["enc.out"]
    # Both ranks encoded their share of the trajectories, into one manifest.
    assert "rank 0 encoded" in logs["enc.out"] and "rank 1 encoded" in logs["enc.out"]
    latents = json.loads((root / "latents" / tokenizer_id / "manifest.json").read_text())
    assert latents["tokenizer_id"] == tokenizer_id and len(latents["shards"]) == 4


# ---- the real thing: shodh.pretrain across node1 + node2 ----------------------------------------

STEPS_PLAIN, STEPS_PREEMPT = 6, 30


def _metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def pretrain_jobs(cluster, tmp_path_factory):
    """Submits two smoke pretraining jobs at once (2 nodes x 1 task, ep_size=2, gloo): `plain`
    runs to the end; `preempt` gets USR1 once it has logged a few steps. The tests wait on them.
    Each job logs to its own sqlite MLflow store, passed through MLFLOW_TRACKING_URI."""
    from latent_fixture import make_latents  # the pretraining tests' synthetic latent workspace

    # DeepSpeed JIT-builds its CPU shared-memory comm op on first use; build (or load) it once
    # here, so that four ranks do not race for torch's extension lock inside the jobs.
    warm = subprocess.run([sys.executable, "-c", "from deepspeed.accelerator import get_accelerator as g; "
                           "b = g().create_op_builder('ShareMemCommBuilder'); b and b.load()"],
                          env=cluster, capture_output=True, text=True, timeout=600)
    assert warm.returncode == 0, warm.stderr[-3000:]
    base = tmp_path_factory.mktemp("pretrain")
    root = base / "ws"
    make_latents(root)
    jobs = {}
    for name, steps in (("plain", STEPS_PLAIN), ("preempt", STEPS_PREEMPT)):
        uri = f"sqlite:///{base / name}-mlflow.db"
        log = base / f"{name}.out"
        # ckpt_every beyond the run: the preempted run's only mid-run checkpoint is the USR1 one.
        job = sbatch({**cluster, "MLFLOW_TRACKING_URI": uri}, f"--output={log}",
                     str(REPO / "slurm" / "pretrain.sbatch"), "--profile", "smoke", "--root", str(root),
                     "--run-name", name, "model.ep_size=2", f"train.max_steps={steps}", "train.ckpt_every=1000",
                     cwd=base)
        jobs[name] = {"job": job, "log": log, "uri": uri, "run_dir": root / "runs" / "shodh" / name, "steps": steps}
    pre = jobs["preempt"]
    wait_until(lambda: any(m.get("step", 0) >= 2 for m in _metrics(pre["run_dir"])) or
               job_info(cluster, pre["job"])["JobState"] in TERMINAL, 300, "the preempt job to log step 2")
    pre["signalled_at"] = max(m["step"] for m in _metrics(pre["run_dir"]))
    subprocess.run(["scancel", "--signal=USR1", "--batch", str(pre["job"])], env=cluster, check=True, timeout=30)
    yield jobs
    for info in jobs.values():
        subprocess.run(["scancel", str(info["job"])], env=cluster, timeout=30)


def _mlflow_run(uri: str, name: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()],
                              filter_string=f"attributes.run_name = '{name}'")
    assert len(runs) == 1, f"expected one MLflow run named {name}, found {len(runs)}"
    return client, runs[0]


def test_pretrain_on_two_nodes_completes_with_checkpoint_and_route_metrics(cluster, pretrain_jobs):
    job = pretrain_jobs["plain"]
    info = wait_for(cluster, job["job"], 300, job["log"])
    text = job["log"].read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "0"), text
    assert info["NodeList"] == "node[1-2]" and "2 nodes x 1 tasks" in text
    ckpt = job["run_dir"] / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS_PLAIN:06d}"
    assert (ckpt / f"step-{STEPS_PLAIN:06d}").is_dir()
    assert [m["step"] for m in _metrics(job["run_dir"]) if "train/loss" in m][-1] == STEPS_PLAIN
    client, run = _mlflow_run(job["uri"], "plain")
    assert run.info.status == "FINISHED"
    route = [k for k in run.data.metrics if k.startswith("route/")]
    assert any(k.startswith("route/channel/") for k in route) and any(k.startswith("route/porous/") for k in route)


def test_pretrain_usr1_checkpoints_requeues_and_resumes(cluster, pretrain_jobs):
    job = pretrain_jobs["preempt"]
    info = wait_for(cluster, job["job"], 300, job["log"])
    text = job["log"].read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert "preempted: 2 of 2 ranks checkpointed" in text
    # The restart resumed from the USR1 checkpoint (the only one before the end), not from 0.
    resumed = [int(line.split("resumed fully at step ")[1].split()[0])
               for line in text.splitlines() if "resumed fully at step " in line]
    assert resumed and all(step == resumed[0] for step in resumed), text
    assert job["signalled_at"] <= resumed[0] < STEPS_PREEMPT
    steps = [m["step"] for m in _metrics(job["run_dir"]) if "train/loss" in m]
    assert steps == list(range(1, STEPS_PREEMPT + 1))  # each step logged once across both attempts
    ckpt = job["run_dir"] / "checkpoints"
    assert (ckpt / "latest").read_text().strip() == f"step-{STEPS_PREEMPT:06d}"
    assert (ckpt / f"step-{resumed[0]:06d}").is_dir()
    client, run = _mlflow_run(job["uri"], "preempt")  # the restart reattached to the same run
    assert run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")][-1] == STEPS_PREEMPT


def test_pretrain_preempted_on_two_nodes_resumes_elastically_on_one(cluster, tmp_path):
    """SHODH_ELASTIC=1: the job runs on both nodes (ep_size 2) until USR1 checkpoints and requeues it;
    node2 is drained meanwhile and the pending job is resized to one node, as an operator would. The
    restart lowers ep_size to 1, converts the checkpoint (train.resume=elastic, global batch kept
    by doubling the accumulation) and finishes the run, every step logged once."""
    from latent_fixture import make_latents

    root = tmp_path / "ws"
    make_latents(root)
    log = tmp_path / "elastic.out"
    # Enough steps that USR1 lands mid-run: the smoke model takes milliseconds a step, and with 8
    # steps the job had finished before the signal came whenever the machine was busy (the test
    # then waited for a requeue that could not happen).
    steps = 200
    job = sbatch({**cluster, "SHODH_ELASTIC": "1"}, "--nodes=2", "--ntasks-per-node=1", f"--output={log}",
                 str(REPO / "slurm" / "pretrain.sbatch"), "--profile", "smoke", "--root", str(root), "--run-name",
                 "elastic", "model.ep_size=2", f"train.max_steps={steps}", "train.ckpt_every=1000",
                 "train.val_every=1000", "train.route_every=1000", "tracking.mlflow=false", cwd=tmp_path)
    run = root / "runs" / "shodh" / "elastic"
    drained = False
    try:
        wait_until(lambda: any(m.get("step", 0) >= 2 for m in _metrics(run)) or
                   job_info(cluster, job)["JobState"] in TERMINAL, 600, "the job to log step 2")
        assert job_info(cluster, job)["NodeList"] == "node[1-2]", log.read_text()[-3000:]
        subprocess.run(["scontrol", "update", "nodename=node2", "state=drain", "reason=elastic-test"], env=cluster,
                       check=True, timeout=30)
        drained = True
        subprocess.run(["scancel", "--signal=USR1", "--batch", str(job)], env=cluster, check=True, timeout=30)
        wait_until(lambda: job_info(cluster, job)["Restarts"] == "1" and job_info(cluster, job)["JobState"] == "PENDING",
                   300, "the job to requeue", lambda: f"{job_info(cluster, job)}\n{log.read_text()[-3000:]}")
        subprocess.run(["scontrol", "update", f"jobid={job}", "numnodes=1", "numtasks=1"], env=cluster, check=True,
                       timeout=30)
        info = wait_for(cluster, job, 600, log)
    finally:
        if drained:
            subprocess.run(["scontrol", "update", "nodename=node2", "state=resume"], env=cluster, timeout=30)
    text = log.read_text()
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), text
    assert info["NodeList"] == "node1" and "preempted: 2 of 2 ranks checkpointed" in text
    assert "elastic: model.ep_size 2 -> 1 for world size 1" in text
    resumed = [int(line.split("resumed elastically at step ")[1].split()[0])
               for line in text.splitlines() if "resumed elastically at step " in line]
    assert len(resumed) == 1 and 2 <= resumed[0] < steps, text
    ckpt = run / "checkpoints"
    assert (ckpt / f"step-{resumed[0]:06d}-w1-ep1" / "MANIFEST.json").is_file()
    assert json.loads((ckpt / f"step-{steps:06d}" / "meta.json").read_text())["grad_accum"] == 2  # global batch kept
    assert [m["step"] for m in _metrics(run) if "train/loss" in m] == list(range(1, steps + 1))


# ---- the study as an array job: one task per arm x seed, then the report job -------------------

def test_study_array_tasks_then_report_job(cluster, served_workspace, tmp_path):
    """slurm/study.sbatch on the served workspace (real tokenizer and latents; runs logged
    through the real MLflow server, as a multi-node study would): two arms x one seed as an
    array, the report job submitted by task 0 after both succeeded."""
    from mlflow.tracking import MlflowClient

    import eval_workspace

    root, _, url = served_workspace
    name, experiment, arms = "slurm-study", "slurm-study", ["moe_mixed", "moe_single_channel"]
    args = ["--profile", "smoke", "--root", str(root), "--arms", ",".join(arms), "--seeds", "1",
            *eval_workspace.FAST, "train.max_steps=2", "train.ckpt_every=1", "eval.rollout_steps=1",
            f"study.name={name}", f"tracking.experiment={experiment}"]
    env = {**cluster, "MLFLOW_TRACKING_URI": url}
    array = sbatch(env, "--array=0-1", f"--output={tmp_path}/study-%a.out", str(REPO / "slurm" / "study.sbatch"),
                   *args, cwd=tmp_path)
    first = tmp_path / "study-0.out"
    wait_until(lambda: first.exists() and "report job " in first.read_text(), 180, "task 0 to submit the report job")
    report = int(first.read_text().split("report job ")[1].split()[0])
    report_log = tmp_path / f"shodh-study-report-{report}.out"
    info = wait_for(cluster, report, 600, report_log)
    logs = "\n".join(p.read_text()[-2000:] for p in tmp_path.glob("*.out"))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), logs
    out = subprocess.run(["scontrol", "show", "job", "-o", str(array)], env=cluster, capture_output=True, text=True)
    assert out.stdout.count("JobState=COMPLETED") == 2, out.stdout
    # each task trained its own arm (task i -> arm i, seed 0), and the report read both
    assert "arm moe_mixed, seed 0" in (tmp_path / "study-0.out").read_text()
    assert "arm moe_single_channel, seed 0" in (tmp_path / "study-1.out").read_text()
    runs = root / "runs" / experiment
    for arm in arms:
        assert (runs / f"{name}-{arm}-s0" / "study_arm.json").is_file()
    study = json.loads((runs / name / "study.json").read_text())
    assert study["arms"] == arms and study["seeds"] == 1
    entry = study["negative_transfer"]["vrmse"]["moe_mixed"]["channel"]
    assert entry["reference"] == "moe_single_channel" and math.isfinite(entry["nt"])
    client = MlflowClient(url)
    parent = (runs / name / "mlflow_run_id").read_text().strip()
    children = client.search_runs([client.get_experiment_by_name(experiment).experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == sorted(f"{name}-{a}-s0" for a in arms)
