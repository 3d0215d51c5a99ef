"""`shodh study`: the negative-transfer study (MoE vs dense vs single-domain, router controls).

Files: `config.py` (the `study.*` section), `arms.py` (what each arm trains), `stats.py` (pure
statistics: NT, paired bootstrap, gradient cosines), `conflict.py` (gradient probes at
checkpoints), `report.py` (study.json, study.md, plots), `run.py` (running arms, assembling).
"""
