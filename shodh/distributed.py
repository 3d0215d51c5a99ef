"""The one reader of the process environment, and the one place a process group or device is chosen.

Distributed layout sources, in order: the launcher's RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT,
then SLURM's SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS (for `srun python -m ...` without
a wrapper), then a single process. The `deepspeed` launcher also passes `--local_rank=N` on the
command line; `strip_local_rank` takes it out of argv (it must agree with LOCAL_RANK).
Besides the launcher's variables, only two others are read, here: MLFLOW_TRACKING_URI (a
tracking server instead of the embedded store) and SHODH_LOG_LEVEL (the CLI's default log level).
Two are set, here, unless the user set them: MLflow's HTTP timeout and retry count
(`bound_mlflow_http`), so that a dead tracking server costs seconds, not minutes.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, replace
from typing import Mapping

from shodh.errors import ShodhError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    master_addr: str = "127.0.0.1"
    master_port: int = 29500
    source: str = "single"  # "launcher", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ShodhError(f"environment variable {name}={env[name]!r} is not an integer") from None


def slurm_master(nodelist: str) -> str:
    """First host of a SLURM nodelist ('node[3-5,9],gpu1' -> 'node3'), without calling scontrol.

    Every bracket of the first name is replaced by its first value, as `scontrol show hostnames`
    does ('rack[1-2]-node[3-4]' -> 'rack1-node3'); zero padding is kept ('n[01-04]' -> 'n01').
    """
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    return re.sub(r"\[([^\]]+)\]", lambda m: m.group(1).split(",")[0].split("-")[0], first)


def dist_info(env: Mapping[str, str] | None = None, local_rank_arg: int | None = None) -> DistInfo:
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env or "RANK" in env:
        info = DistInfo(
            rank=_int(env, "RANK") if "RANK" in env else 0,
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else (local_rank_arg or 0),
            world_size=_int(env, "WORLD_SIZE") if "WORLD_SIZE" in env else 1,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 29500,
            source="launcher",
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = _int(env, "SLURM_JOB_ID") if "SLURM_JOB_ID" in env else 0
        info = DistInfo(
            rank=_int(env, "SLURM_PROCID"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            world_size=_int(env, "SLURM_NTASKS"),
            master_addr=env.get("MASTER_ADDR") or slurm_master(env.get("SLURM_JOB_NODELIST", "127.0.0.1")),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else 20000 + job % 20000,
            source="slurm",
        )
    else:
        info = DistInfo(local_rank=local_rank_arg or 0)
    if not 0 <= info.rank < info.world_size:
        raise ShodhError(f"rank {info.rank} is outside world size {info.world_size} ({info.source} environment)")
    if local_rank_arg is not None and local_rank_arg != info.local_rank:
        raise ShodhError(f"--local_rank={local_rank_arg} disagrees with LOCAL_RANK={info.local_rank}")
    return info


def export_env(info: DistInfo) -> None:
    """Make torch.distributed's env:// init see the resolved values (needed under plain srun)."""
    os.environ.update({
        "RANK": str(info.rank), "LOCAL_RANK": str(info.local_rank), "WORLD_SIZE": str(info.world_size),
        "MASTER_ADDR": info.master_addr, "MASTER_PORT": str(info.master_port),
    })


def strip_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """Remove the launcher's `--local_rank=N` / `--local_rank N` from argv; return it."""
    out, value, i = [], None, 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            value = int(arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            value, i = int(argv[i + 1]), i + 1
        else:
            out.append(arg)
        i += 1
    return out, value


def array_task(env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """(task index, task count) of a SLURM array job, or (0, 1) outside one."""
    env = os.environ if env is None else env
    if "SLURM_ARRAY_TASK_ID" not in env:
        return 0, 1
    index = _int(env, "SLURM_ARRAY_TASK_ID") - (_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0)
    count = _int(env, "SLURM_ARRAY_TASK_COUNT") if "SLURM_ARRAY_TASK_COUNT" in env else 1
    return index, count


def tracking_uri_env() -> str:
    """MLFLOW_TRACKING_URI, or "" when unset (the embedded store is then used)."""
    return os.environ.get("MLFLOW_TRACKING_URI", "")


# MLflow's defaults are a 120 s timeout and 7 retries with exponential backoff (about 4 min per
# call against a dead server). Tracking runs in a background thread and turns itself off after the
# first failure, so one short try is all a training process should spend on a call.
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "5", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}


def bound_mlflow_http() -> dict[str, str]:
    """Give MLflow's HTTP client in this process a short timeout and no retries (MLflow reads these
    variables at every request), keeping any value the user set; returns the values in effect."""
    for name, value in MLFLOW_HTTP_BOUNDS.items():
        os.environ.setdefault(name, value)
    return {name: os.environ[name] for name in MLFLOW_HTTP_BOUNDS}


def log_level_env(default: str = "INFO") -> str:
    return os.environ.get("SHODH_LOG_LEVEL", default)


def child_env(**extra: str) -> dict[str, str]:
    """This process's environment plus `extra`, for a server or tool started from shodh."""
    return {**os.environ, **extra}


def _free_port() -> int:
    """A free TCP port for a single-process rendezvous (29500 may be taken by a neighbour)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def choose_device(requested: str, info: DistInfo):
    """torch.device for this rank: "auto" = this rank's GPU when there is one, else the CPU
    (denormals flushed to zero, see below); a bare "cuda" means this rank's GPU (LOCAL_RANK).
    A CUDA device is also made the current one."""
    import torch

    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type == "cpu":
        # Flush denormals to zero. GELU's derivative nears underflow for strongly negative inputs, so
        # backward passes carry float32 denormals into conv3d's backward, which slows down on x86
        # as training goes on (tokenizer training: 2.45 -> 4.17 fields/s over 200 demo steps, the
        # same losses); values below 1.2e-38 carry no information here.
        torch.set_flush_denormal(True)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    return device


def init_process_group(info: DistInfo, device, always: bool = False) -> DistInfo:
    """Join the torch.distributed group of this launch (gloo on CPU, nccl on CUDA).

    A single process joins nothing unless `always` (DeepSpeed needs a group even for one rank: it
    then gets a private one on a free loopback port). DeepSpeed adopts the existing group when
    `deepspeed.initialize` runs. Returns the info as used (the port of a single process may change).
    """
    import torch.distributed as dist

    if dist.is_initialized() or not (info.distributed or always):
        return info
    if info.source == "single":
        info = replace(info, master_port=_free_port())
    export_env(info)
    dist.init_process_group("nccl" if getattr(device, "type", device) == "cuda" else "gloo",
                            rank=info.rank, world_size=info.world_size)
    return info


def unlink_deepspeed_shm() -> None:
    """Give DeepSpeed's CPU all-reduce segments back to the system when the processes end.

    DeepSpeed's CPU communication op (deepspeed/ops/csrc/cpu/comm/shm.cpp) maps one /dev/shm segment per
    rank, `deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>` (69 MB), when all ranks are
    on one machine, and never unlinks it: every CPU launch left world_size x 69 MB of RAM-backed tmpfs
    behind, finished or killed, until the machine ran out of memory. Called on every rank after
    `deepspeed.initialize`: a barrier (every rank has mapped every segment by then), then each rank
    unlinks its own name. The mappings stay valid, and the memory is freed when the last process using
    it exits, however it exits.
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{dist.get_rank()}")
    try:
        os.unlink(os.path.join("/dev/shm", name))
    except FileNotFoundError:  # GPU backends, ranks on several machines, or already unlinked
        pass
