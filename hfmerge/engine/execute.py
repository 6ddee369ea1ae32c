"""Executing a merge plan: stream every output tensor from the sources to the shards."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from hfmerge.engine.ops import TensorRef
from hfmerge.engine.plan import MergePlan
from hfmerge.errors import MergeNumericError
from hfmerge.io.checkpoint import TensorTable
from hfmerge.io.writer import ShardedSafetensorsWriter, TensorSlot

logger = logging.getLogger(__name__)


def output_dtype(planned: torch.dtype, override: torch.dtype | None) -> torch.dtype:
    """The dtype written: the source's, or ``override`` for floating tensors."""
    if override is not None and planned.is_floating_point:
        return override
    return planned


def written_bytes(plan: MergePlan, dtype: torch.dtype | None = None) -> int:
    """The bytes of the tensors :func:`execute_plan` writes for ``plan``: what the disk must hold, before any is read.

    The shards' headers, the config and the card come on top (kilobytes).
    """
    return sum(TensorSlot(t.key, t.shape, output_dtype(t.dtype, dtype)).nbytes for t in plan.tensors)


def execute_plan(
    plan: MergePlan,
    tables: Mapping[int | str, TensorTable],
    folder: Path,
    *,
    dtype: torch.dtype | None = None,
    max_shard_size: int = 5 * 10**9,
    progress: bool = True,
) -> list[str]:
    """Compute every tensor of ``plan`` in float32 and write it to ``folder``.

    Sources are read through their memory-mapped checkpoints one tensor at a
    time; each output tensor is cast and appended to its shard as soon as it
    is computed, so peak memory is a few tensors whatever the number of
    sources. ``tables`` are the models' checkpoints by index, then the tables the
    stages made (statistics, derived or trained tensors) by name, as the plan names them.

    Raises:
        MergeNumericError: a tensor came out NaN or infinite (also after a cast
            to a narrower dtype).
    """
    def load(ref: TensorRef) -> torch.Tensor:
        index, key = ref
        return tables[index].get(key)

    slots = [TensorSlot(t.key, t.shape, output_dtype(t.dtype, dtype)) for t in plan.tensors]
    writer = ShardedSafetensorsWriter(folder, slots, max_shard_size)
    try:
        for entry, slot in tqdm(
            list(zip(plan.tensors, slots)), desc="Merging", unit="tensor", disable=not progress, leave=False
        ):
            result = entry.op.apply(load)
            if tuple(result.shape) != entry.shape:
                raise RuntimeError(f"{entry.key}: planned shape {entry.shape}, computed {tuple(result.shape)}")
            if slot.dtype.is_floating_point:
                if not _all_finite(result):
                    raise MergeNumericError(
                        f"the merge produced NaN or inf in {entry.key}; check the sources for NaN/inf weights "
                        "and the method's parameters (e.g. a smaller --lambda)"
                    )
                out = result.to(slot.dtype)
                if out.dtype != result.dtype and not _all_finite(out):
                    raise MergeNumericError(
                        f"{entry.key} overflows {str(slot.dtype).removeprefix('torch.')}; write a wider dtype "
                        "(--dtype float32 or bfloat16)"
                    )
            else:
                out = result.to(slot.dtype)
            writer.write(entry.key, out)
        return writer.close()
    finally:
        writer.abort()


def _all_finite(tensor: torch.Tensor) -> bool:
    """Whether no element is NaN or ±inf.

    A float32 sum is finite whenever every element is (NaN and inf propagate);
    only when it is not — or overflows — do we pay for the element-wise check.
    """
    total = tensor.sum(dtype=torch.float32)
    return bool(torch.isfinite(total)) or bool(torch.isfinite(tensor).all())
