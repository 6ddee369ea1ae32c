"""Writing safetensors shards tensor by tensor.

A merge plan knows every output tensor's name, shape and dtype before any is
computed, so each shard's header can be written first and the tensors appended
as they are produced: the writer never holds more than the tensor in hand.
The files are ordinary safetensors (8-byte header length, JSON header padded
to 8 bytes, contiguous data), readable by ``safe_open`` and transformers.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from hfmerge.io.checkpoint import SAFETENSORS_INDEX, SAFETENSORS_SINGLE, TORCH_TO_SAFETENSORS


@dataclass(frozen=True)
class TensorSlot:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        numel = 1
        for d in self.shape:
            numel *= d
        return numel * torch.empty((), dtype=self.dtype).element_size()


class ShardedSafetensorsWriter:
    """Streams tensors, in a fixed order, into ``model.safetensors`` or numbered shards plus an index."""

    def __init__(self, folder: Path, slots: list[TensorSlot], max_shard_size: int) -> None:
        self.folder = folder
        self.slots = slots
        shards: list[list[TensorSlot]] = [[]]
        size = 0
        for slot in slots:
            if shards[-1] and size + slot.nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append(slot)
            size += slot.nbytes
        self.shards = shards
        n = len(shards)
        self.filenames = (
            [SAFETENSORS_SINGLE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        )
        self._shard_of = {s.key: i for i, shard in enumerate(shards) for s in shard}
        self._expected = iter(slots)
        self._current: int | None = None
        self._file: BinaryIO | None = None
        self.bytes_written = 0

    def write(self, key: str, tensor: torch.Tensor) -> None:
        """Append ``tensor`` as ``key``; tensors must come in the order of ``slots``."""
        slot = next(self._expected)
        if slot.key != key or tuple(tensor.shape) != slot.shape or tensor.dtype != slot.dtype:
            raise RuntimeError(f"writer expected {slot}, got {key} {tuple(tensor.shape)} {tensor.dtype}")
        shard = self._shard_of[key]
        if shard != self._current:
            self._open(shard)
        data = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy()
        assert self._file is not None
        self._file.write(memoryview(data))
        self.bytes_written += data.nbytes

    def _open(self, shard: int) -> None:
        self._close_file()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for slot in self.shards[shard]:
            header[slot.key] = {
                "dtype": TORCH_TO_SAFETENSORS[slot.dtype],
                "shape": list(slot.shape),
                "data_offsets": [offset, offset + slot.nbytes],
            }
            offset += slot.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self._file = open(self.folder / self.filenames[shard], "wb")  # noqa: SIM115 - closed in _close_file
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self.bytes_written += 8 + len(raw)
        self._current = shard

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> list[str]:
        """Finish the last shard and write the index when sharded; returns the files written."""
        self._close_file()
        if next(self._expected, None) is not None:
            raise RuntimeError("writer closed before every tensor was written")
        files = list(self.filenames)
        if len(self.filenames) > 1:
            index = {
                "metadata": {"total_size": sum(s.nbytes for s in self.slots)},
                "weight_map": {s.key: self.filenames[self._shard_of[s.key]] for s in self.slots},
            }
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
            files.append(SAFETENSORS_INDEX)
        return files

    def abort(self) -> None:
        self._close_file()
