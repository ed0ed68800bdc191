"""Fieldprint: fused anchor + paged attention with a verifiable KV cache."""

__version__ = "0.1.0"
