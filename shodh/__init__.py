"""shodh: multi-physics latent foundation models for 3D flow with sparse Mixture-of-Experts.

Pipeline (one package per stage, each importing only the stages before it and the leaves):
physics -> tokenizer -> data -> model -> train -> eval -> study, over the leaves `errors`,
`io` (atomic writes, JSON, hashing, shard reading), `workspace` (every path and id under --root),
`fields` (spectral operators, field metrics, normalization), `schedule` (the lr schedule),
`distributed` (the one reader of the process environment), `config` and `tracking`.

Shape legend, one for the whole project: tensor names carry these letters as suffixes (`u_BCXYZ`).
    B batch                     C channels: 3 velocity components, or latent channels
    X Y Z grid axes             x y z latent grid, where a field grid is in the same function
    H halved rfft axis N//2+1   S spectral shells round(|k|)
    T frames of a trajectory    N tokens per sample           P values per patch (C p^3)
    D model width               F FFN width                   M attention heads    A head width
    G gate inputs (B*N tokens in one gate call)               E experts            L MoE layers
    K domains                   W conv width                  R seeds (runs)       I test samples
    Q bootstrap replicates     V parameters of a flat gradient vector
"""

__version__ = "0.1.0"
