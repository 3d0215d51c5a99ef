"""DeepSpeed configs shipped with shodh; installed as the package `shodh.ds_configs` (pyproject.toml)
so `train.ds_config=NAME` finds them outside a checkout. This file only makes the folder importable."""
