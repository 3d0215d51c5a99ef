"""Stage 1 beside `physics`: `shodh import` brings published or foreign flow data into the raw
shard contract (DESIGN.md), so every later stage trains on it next to the simulated domains.

Modules: `sources.py` (lazy readers of Well-format HDF5 and plain npy / HDF5 arrays),
`boundaries.py` (making wall axes periodic: mirror extension or solid padding), `importer.py`
(checks, divergence measurement and projection, shards, the domain's manifest section).
"""
