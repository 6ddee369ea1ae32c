"""The Swin backbone that UperNet and Mask2Former share: its tiny test configuration."""

from __future__ import annotations

from typing import Any


def tiny_swin(**extra: Any) -> Any:
    """A Swin backbone config of 32 px, width 8 and one block per stage, all four stages out (no transformers
    import until it is called)."""
    from transformers import SwinConfig

    return SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1, 1, 1], num_heads=[1, 1, 1, 1],
                      window_size=2, out_features=["stage1", "stage2", "stage3", "stage4"], **extra)
