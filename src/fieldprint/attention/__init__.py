"""Attention over a paged KV cache with pinned anchor blocks (docs/DESIGN.md,
"Kernel arguments").

``paged_anchor_attention`` is the fused Triton kernel; ``reference_attention`` the plain PyTorch
definition it is tested against.
"""

from fieldprint.attention.reference import reference_attention

__all__ = ["reference_attention", "paged_anchor_attention"]


def __getattr__(name: str):
    # The kernel module imports triton; load it only when asked for, so that the reference
    # stays importable (and fast to import) everywhere.
    if name == "paged_anchor_attention":
        from fieldprint.attention.kernel import paged_anchor_attention

        return paged_anchor_attention
    raise AttributeError(name)
