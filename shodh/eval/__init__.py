"""Evaluation of pretrained runs: `routing.py` (route/* report), `plots.py` (figures),
`evaluate.py` (`shodh evaluate`), `config.py` (the `eval.*` section)."""
