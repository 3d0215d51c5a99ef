"""Evaluation of pretrained runs: `metrics.py` (pure field metrics), `routing.py` (route/* report),
`plots.py` (figures), `evaluate.py` (`shodh evaluate`), `config.py` (the `eval.*` section)."""
