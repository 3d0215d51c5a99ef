"""Distributed entry for pretraining: `deepspeed --num_gpus N --module shodh.pretrain --profile P --root DIR
[--run-name NAME] [overrides]`, `srun python -m shodh.pretrain ...`, or `python -m shodh.pretrain ...`;
identical to `shodh pretrain ...` (see `shodh.cli.module_main`).
"""

from shodh.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("pretrain"))
