"""data_pipeline/simulate.py: worker processes and array-task splits produce the same data."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TINY = ["sim.frames=2", "sim.trajectories.train=2", "sim.trajectories.val=0", "sim.trajectories.test=1",
        "sim.channel.spinup_time=4.0", "sim.channel.settle_time=1.0", "sim.channel.decorrelation_time=1.0",
        "sim.porous.spinup_time=1.0",
        "sim.threads=1"]


def run(*args, check=True):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def shard_hashes(root: Path) -> dict:
    manifest = json.loads((root / "raw" / "manifest.json").read_text())
    return {s["path"]: s["sha256"] for s in manifest["shards"]}


def test_workers_and_array_tasks_match_single_process(tmp_path):
    single, workers, array = tmp_path / "single", tmp_path / "workers", tmp_path / "array"
    run("-m", "shodh", "simulate", "--profile", "smoke", "--root", str(single), *TINY)
    run("data_pipeline/simulate.py", "--profile", "smoke", "--root", str(workers), "--workers", "2", *TINY)
    for index in (0, 1):
        run("data_pipeline/simulate.py", "--profile", "smoke", "--root", str(array), "--no-merge",
            "--task-index", str(index), "--num-tasks", "2", *TINY)
        if index == 0:  # half the trajectories are missing: the merge must refuse
            proc = run("data_pipeline/simulate.py", "--profile", "smoke", "--root", str(array), "--merge-only",
                       *TINY, check=False)
            assert proc.returncode == 2 and "trajectories missing" in proc.stderr
    run("data_pipeline/simulate.py", "--profile", "smoke", "--root", str(array), "--merge-only", *TINY)
    expected = shard_hashes(single)
    assert len(expected) == 6
    assert shard_hashes(workers) == expected
    assert shard_hashes(array) == expected


def test_bad_task_index_is_refused(tmp_path):
    proc = run("data_pipeline/simulate.py", "--profile", "smoke", "--root", str(tmp_path), "--task-index", "3",
               "--num-tasks", "2", check=False)
    assert proc.returncode == 2 and "--task-index 3" in proc.stderr
