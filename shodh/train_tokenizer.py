"""Distributed entry for `shodh train-tokenizer`: `deepspeed --module shodh.train_tokenizer --profile P --root DIR [overrides]`,
`srun python -m shodh.train_tokenizer ...`, `torchrun -m shodh.train_tokenizer ...`, or plain
`python -m shodh.train_tokenizer ...`.

Identical to `shodh train-tokenizer ...`: the launcher's `--local_rank=N` is taken out of argv here and
checked against LOCAL_RANK by `shodh.distributed`; everything else is the CLI verb.
"""

from shodh.cli import module_main

if __name__ == "__main__":
    raise SystemExit(module_main("train-tokenizer"))
