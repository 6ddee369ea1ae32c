"""How ``from_pretrained`` renames checkpoint keys to in-memory parameter names (transformers 5)."""

from __future__ import annotations

import torch


def checkpoint_to_memory_names(
    model: torch.nn.Module, keys: list[str], meta_state: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Map checkpoint keys to in-memory parameter names the way ``from_pretrained`` does.

    transformers 5 keeps the original checkpoint names on disk and renames them
    while loading (``vit.encoder.layer.0.attention.attention.query.weight`` on
    disk is ``vit.layers.0.attention.q_proj.weight`` in memory); its conversion
    mapping also adds or strips the base model prefix. We apply that same
    mapping, so names and depth order come from the model class.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:  # an older transformers without renaming: names are identical
        return {k: k for k in keys}
    conversions = get_model_conversion_mapping(model)
    renamings = [c for c in conversions if isinstance(c, WeightRenaming)]
    converters = [c for c in conversions if isinstance(c, WeightConverter)]
    prefix = getattr(model, "base_model_prefix", None) or None
    return {
        key: rename_source_key(key, renamings, converters, prefix, meta_state)[0]
        for key in keys
    }
