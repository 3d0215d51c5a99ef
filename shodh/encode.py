"""Distributed entry for `shodh encode`: `deepspeed --module shodh.encode --profile P --root DIR [overrides]`,
`srun python -m shodh.encode ...`, or `python -m shodh.encode ...`; identical to `shodh encode ...`
(see `shodh.cli.module_main`).
"""

from shodh.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("encode"))
