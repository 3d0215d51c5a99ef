"""Divergence-free field tokenizer: raw velocity fields [3, N, N, N] <-> latents [C, 16, 16, 16].

Files: `config.py` (the `tokenizer.*` section), `model.py` (network, checkpoint loading),
`train.py` (`shodh train-tokenizer`), `audit.py` (`shodh audit`), `encode.py` (`shodh encode`,
latent shards). The curl/div operator pairs and `Normalization` live in `shodh.fields`.

Python API used by later stages:

    from shodh.tokenizer import load_tokenizer
    tok = load_tokenizer(root, device="cpu")     # ROOT/tokenizer/{tokenizer.pt, tokenizer.json}
    tok.id                                         # 16 hex chars; names ROOT/latents/<id>/
    z = tok.encode(u_BCXYZ, mask_BXYZ, domain)    # physical float32 in -> float32 [B, C, 16, 16, 16]
    u = tok.decode(z_BCXYZ, mask_BXYZ, domain)    # float64 [B, 3, N, N, N], physical units
    tok.norm.normalize(u, domain) / tok.norm.denormalize(v, domain)

Decoding needs the trajectory's solid mask (`mask.npy`, static per trajectory, in every raw
frame) and its domain (`meta.json`), both read from the raw shard of the same trajectory.
Latent shards store raw (unnormalized) encoder output; their manifest has per-channel stats.
"""

from shodh.tokenizer.model import Tokenizer, load_tokenizer

__all__ = ["Tokenizer", "load_tokenizer"]
