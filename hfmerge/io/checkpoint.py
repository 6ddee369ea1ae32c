"""Reading checkpoints one tensor at a time.

:class:`CheckpointReader` opens a folder's safetensors files memory-mapped and
hands out single tensors on demand, so a merge never holds a whole model.
Pickle checkpoints are read only when the user opted in, with
``torch.load(weights_only=True, mmap=True)``. :class:`HeaderReader` knows the
same names, shapes and dtypes from safetensors headers alone (read from the
Hub with range requests), which is all a plan or a ``--dry-run`` needs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import safe_open

from hfmerge.errors import SourceError

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_SAFETENSORS = {v: k for k, v in SAFETENSORS_DTYPES.items()}

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_NAMES = ("pytorch_model.bin", "model.bin", "model.pt", "model.pth")


def weight_files(folder: Path) -> tuple[list[Path], bool]:
    """The weight files of ``folder`` and whether they are pickles; a single safetensors file is itself."""
    if folder.is_file() and folder.suffix == ".safetensors":
        return [folder], False
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names], False
    if (folder / SAFETENSORS_SINGLE).is_file():
        return [folder / SAFETENSORS_SINGLE], False
    loose = sorted(folder.glob("*.safetensors"))
    if loose:
        return loose, False
    index = folder / PICKLE_INDEX
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names], True
    return [folder / n for n in PICKLE_NAMES if (folder / n).is_file()], True


class TensorTable:
    """Names, shapes and dtypes of a checkpoint's tensors, in file order: what inspection and planning read."""

    is_pickle = False

    def __init__(self) -> None:
        self._key_to_file: dict[str, Path] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._dtypes: dict[str, torch.dtype] = {}

    def _add(self, key: str, path: Path, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self._key_to_file[key] = path
        self._shapes[key] = shape
        self._dtypes[key] = dtype

    def keys(self) -> list[str]:
        return list(self._key_to_file)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def nbytes(self, key: str) -> int:
        numel = 1
        for d in self._shapes[key]:
            numel *= d
        return numel * torch.empty((), dtype=self._dtypes[key]).element_size()

    def get(self, key: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files; the table of names, shapes and dtypes stays."""


class HeaderReader(TensorTable):
    """A checkpoint known from its safetensors headers only; it has no tensor data to give.

    Args:
        tensors: per checkpoint key, its file, shape and safetensors dtype string (``"F32"``...).
        label: how messages name the source.

    Raises:
        SourceError: a tensor has a dtype hfmerge cannot merge.
    """

    def __init__(self, tensors: Mapping[str, tuple[str, Sequence[int], str]], *, label: str) -> None:
        super().__init__()
        self.label = label
        # file by file, keys sorted within each, as safe_open lists them
        for key, (filename, shape, dtype_name) in sorted(tensors.items(), key=lambda kv: (kv[1][0], kv[0])):
            dtype = SAFETENSORS_DTYPES.get(dtype_name)
            if dtype is None:
                raise SourceError(f"{label}: tensor {key} has dtype {dtype_name}, which hfmerge cannot merge")
            self._add(key, Path(filename), tuple(int(d) for d in shape), dtype)

    def get(self, key: str) -> torch.Tensor:
        raise RuntimeError(f"{self.label} was inspected from its safetensors headers only; resolve it to read {key}")


class MemoryTable(TensorTable):
    """Tensors a stage computed in memory (a method's transport maps), read like a checkpoint."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], *, label: str) -> None:
        super().__init__()
        self.label = label
        self._tensors = dict(tensors)
        for key, tensor in self._tensors.items():
            self._add(key, Path(label), tuple(tensor.shape), tensor.dtype)

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key]


class SafetensorsFile(TensorTable):
    """One safetensors file whose tensors are read with ordinary file reads, not memory-mapped.

    A memory-mapped file's pages count in the process's resident memory for as
    long as the file is open: every gigabyte of statistics a merge reads that way
    stays in its RSS until the end. Read with ``readinto``, each tensor is a
    private copy freed with it, and the file's pages are only the kernel's page
    cache, which it reclaims.

    Raises:
        SourceError: the file is missing, or its header is not a safetensors header hfmerge can read.
    """

    def __init__(self, path: str | Path, *, label: str | None = None) -> None:
        super().__init__()
        self.path = Path(path)
        label = label or str(path)
        self._offsets: dict[str, tuple[int, int]] = {}
        try:
            with open(self.path, "rb") as f:
                length = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(length))
                size = f.seek(0, 2)
            self._start = 8 + length
            for key, info in header.items():
                if key == "__metadata__":
                    continue
                dtype = SAFETENSORS_DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
                self._add(key, self.path, shape, dtype)
                if end - begin != self.nbytes(key) or self._start + end > size:
                    raise ValueError(f"tensor {key} does not fit its data offsets")
                self._offsets[key] = (begin, end)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SourceError(f"{label} is not a readable safetensors file ({exc})") from None

    def get(self, key: str) -> torch.Tensor:
        begin, end = self._offsets[key]
        tensor = torch.empty(self.shape(key), dtype=self.dtype(key))
        buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
        with open(self.path, "rb") as f:
            f.seek(self._start + begin)
            done = 0
            while done < end - begin:
                read = f.readinto(buffer[done:])
                if not read:
                    raise SourceError(f"{self.path} ended inside tensor {key}")
                done += read
        return tensor


class CheckpointReader(TensorTable):
    """Lazy, memory-mapped access to every tensor of one checkpoint folder."""

    def __init__(self, folder: str | Path, *, allow_pickle: bool = False, label: str | None = None) -> None:
        super().__init__()
        self.folder = Path(folder)
        label = label or str(folder)
        files, pickled = weight_files(self.folder)
        if not files:
            raise SourceError(f"{label} has no weights: expected model.safetensors or a safetensors index")
        if pickled and not allow_pickle:
            raise SourceError(
                f"{label} has only pickle weights ({files[0].name}); pickle can run code when loaded: "
                "convert it to safetensors, or pass --allow-pickle to read it with torch.load(weights_only=True)"
            )
        self._handles: dict[Path, object] = {}
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.is_pickle = pickled
        for path in files:
            if pickled:
                try:
                    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except Exception as exc:  # noqa: BLE001 - any unpickling failure is the file's fault
                    raise SourceError(f"{label}: {path.name} cannot be read with weights_only=True ({exc})") from None
                if not isinstance(state, dict):
                    raise SourceError(f"{label}: {path.name} does not hold a state dict")
                self._pickled[path] = state
                for key, tensor in state.items():
                    self._add(key, path, tuple(tensor.shape), tensor.dtype)
                continue
            try:
                handle = safe_open(str(path), framework="pt")
            except Exception as exc:  # noqa: BLE001 - a corrupt header is reported, not raised raw
                raise SourceError(f"{label}: {path.name} is not a readable safetensors file ({exc})") from None
            self._handles[path] = handle
            for key in handle.keys():
                sl = handle.get_slice(key)
                dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
                if dtype is None:
                    raise SourceError(f"{label}: tensor {key} has dtype {sl.get_dtype()}, which hfmerge cannot merge")
                self._add(key, path, tuple(sl.get_shape()), dtype)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` released the files (a finished merge's readers are closed)."""
        return not (self._handles or self._pickled)

    def get(self, key: str) -> torch.Tensor:
        """Read one tensor (memory-mapped: only this tensor's pages are touched)."""
        if self.closed:
            raise RuntimeError(f"the checkpoint reader of {self.folder} is closed; inspect the source again to read it")
        path = self._key_to_file[key]
        if self.is_pickle:
            return self._pickled[path][key]
        return self._handles[path].get_tensor(key)  # type: ignore[attr-defined]

    def close(self) -> None:
        self._handles.clear()
        self._pickled.clear()
