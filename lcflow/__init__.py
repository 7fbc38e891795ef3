"""Latent Cache Flow: model-to-model communication through compressed KV caches."""

__version__ = "0.1.0"
