"""shodh: multi-physics latent foundation models for 3D flow with sparse Mixture-of-Experts."""

__version__ = "0.1.0"
