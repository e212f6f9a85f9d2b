"""Preset configurations (TOML), installed as ``retinaface_jax.configs``."""
