"""How ``from_pretrained`` renames checkpoint keys to in-memory parameter names (transformers 5)."""

from __future__ import annotations

import torch


class ConvertedOnLoadError(ValueError):
    """transformers converts a checkpoint tensor while loading it (splits, joins or reshapes it), not only renames it.

    hfmerge reads every checkpoint tensor as the one parameter it names and writes it back under its
    key, so such a tensor has no parameter to be merged as: DINOv2's SwiGLU checkpoints store
    ``mlp.weights_in``, which transformers 5 splits in two (``gate_proj``, ``up_proj``) on load. The
    caller, which knows the source, says so to the user.

    Attributes:
        key: the first checkpoint key a converter matches.
        targets: the in-memory names the converter makes of it (their patterns, as transformers declares them).
    """

    def __init__(self, key: str, targets: tuple[str, ...]) -> None:
        super().__init__(f"transformers converts {key} into {', '.join(targets)} on load")
        self.key = key
        self.targets = targets


def checkpoint_to_memory_names(
    model: torch.nn.Module, keys: list[str], meta_state: dict[str, torch.Tensor]
) -> dict[str, str]:
    """Map checkpoint keys to in-memory parameter names the way ``from_pretrained`` does.

    transformers 5 keeps the original checkpoint names on disk and renames them
    while loading (``vit.encoder.layer.0.attention.attention.query.weight`` on
    disk is ``vit.layers.0.attention.q_proj.weight`` in memory); its conversion
    mapping also adds or strips the base model prefix. We apply that same
    mapping, so names and depth order come from the model class.

    Raises:
        ConvertedOnLoadError: a key that a ``WeightConverter`` matches: transformers changes its
            tensor on load (every converter carries operations: a split, a concatenation, a
            transpose), so no in-memory parameter is that tensor as stored.
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
    names: dict[str, str] = {}
    for key in keys:
        names[key], converted_by = rename_source_key(key, renamings, converters, prefix, meta_state)
        if converted_by is not None:
            targets = next((c.target_patterns for c in converters if converted_by in c.source_patterns), [names[key]])
            raise ConvertedOnLoadError(key, tuple(targets))
    return names
