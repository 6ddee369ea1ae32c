"""Plan → folder: the one step that writes a planned merge as a model folder.

Used by the merge itself, by every comparison row of an evaluation (another
plan over the same tables) and so by every path that turns a plan into files:
the tensors streamed through the plan's operations into safetensors shards,
then the config, the method's own files or the family's, and the anchor's
image processor.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hfmerge.engine.execute import execute_plan, output_dtype

if TYPE_CHECKING:
    import torch

    from hfmerge.engine.plan import MergePlan
    from hfmerge.io.checkpoint import TensorTable
    from hfmerge.recipe import PlannedMerge

PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json", "image_processor_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt")
"""A text tower's tokenizer files, written beside an output whose processor is another model's (a ``CLIPModel``)."""


def materialise(planned: PlannedMerge, plan: MergePlan, tables: Mapping[int | str, TensorTable], folder: Path, *,
                dtype: torch.dtype | None = None, max_shard_size: int = 5 * 10**9, progress: bool = True,
                files: Mapping[str, str | bytes] | None = None) -> Any:
    """Write ``plan``'s tensors, read from ``tables``, and the model's other files into ``folder``; its config.

    ``files`` are more files for the folder (pictures a stage made for the card).
    """
    execute_plan(plan, tables, folder, dtype=dtype, max_shard_size=max_shard_size, progress=progress)
    config = output_config(planned, dtype, plan)
    write_model_files(planned, plan, config, folder, files)
    return config


def write_model_files(planned: PlannedMerge, plan: MergePlan, config: Any, folder: Path,
                      extra: Mapping[str, str | bytes] | None = None) -> None:
    """Beside the weights: the config, the method's own output files (a modeling file...), the anchor's processor."""
    config.save_pretrained(folder)
    files = dict(plan.output.files) if plan.output is not None else planned.anchor.family.file_texts()
    files.update(extra or {})
    for name, content in files.items():
        path = folder / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    processor = plan.output.processor_from if plan.output is not None else None
    for name in PROCESSOR_FILES + (TOKENIZER_FILES if processor is not None else ()):
        path = (processor or planned.anchor.source.path) / name
        if path.is_file():
            shutil.copyfile(path, folder / name)


def output_config(planned: PlannedMerge, dtype: torch.dtype | None, plan: MergePlan | None = None) -> Any:
    """The anchor's config with the plan's updates, or the config of the method's own output model."""
    plan = plan or planned.plan
    output = plan.output
    source = output.config if output is not None else planned.anchor.config
    config = type(source).from_dict(source.to_dict())
    for key, value in plan.config_updates.items():
        setattr(config, key, value)
    floating = [output_dtype(t.dtype, dtype) for t in plan.tensors if t.dtype.is_floating_point]
    if floating:
        config.dtype = str(max(set(floating), key=floating.count)).removeprefix("torch.")
    return config
