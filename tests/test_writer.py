"""The streaming safetensors writer: shards, index, and files that safetensors and transformers read back."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import hfmerge
from hfmerge.io.writer import ShardedSafetensorsWriter, TensorSlot


def test_streamed_file_reads_back_exactly(tmp_path):
    tensors = {
        "a": torch.randn(3, 5),
        "b": torch.arange(7, dtype=torch.int64),
        "c": torch.randn(2, 2).to(torch.bfloat16),
        "scalar": torch.tensor(4.5, dtype=torch.float16),
    }
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSlot(k, tuple(v.shape), v.dtype) for k, v in tensors.items()],
                                      max_shard_size=10**9)
    for key, value in tensors.items():
        writer.write(key, value)
    assert writer.close() == ["model.safetensors"]
    loaded = load_file(tmp_path / "model.safetensors")
    assert set(loaded) == set(tensors)
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype and torch.equal(loaded[key], value)
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_out_of_order_tensor_is_refused(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, [TensorSlot("a", (1,), torch.float32), TensorSlot("b", (1,), torch.float32)],
                                      max_shard_size=10**9)
    with pytest.raises(RuntimeError, match="expected"):
        writer.write("b", torch.zeros(1))
    writer.abort()


def test_small_shard_size_writes_shards_and_an_index_that_transformers_loads(make_source, tmp_path):
    a, b = make_source("resnet", seed=1), make_source("resnet", seed=2)
    out = hfmerge.merge([str(a), str(b)], max_shard_size="20KB", progress=False).save(tmp_path / "out")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert all((out / s).stat().st_size <= 20_000 + 4096 for s in shards)  # payload ≤ limit, plus header
    single = hfmerge.merge([str(a), str(b)], progress=False).save(tmp_path / "single")
    sharded_state = hfmerge.load(str(out)).state_dict()
    for name, value in hfmerge.load(str(single)).state_dict().items():
        assert torch.equal(value, sharded_state[name])


def test_a_finished_merge_closes_its_sources_checkpoint_readers(make_source):
    import hfmerge

    a, b = make_source("vit", seed=1), make_source("vit", seed=2)
    result = hfmerge.merge([str(a), str(b)], method="average", progress=False)
    readers = [layout.reader for layout in result.planned.context.models]
    assert readers and all(reader.closed for reader in readers)
