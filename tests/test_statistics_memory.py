"""The statistics stage holds one source at a time: memory flat in the number of sources.

RegMean's memory target (N = 8 ViT-B sources in no more than 1.2× the memory
of 2, ``benchmarks/regmean_memory.py``) holds only if nothing of a source's
statistics pass outlives it. These tests watch, with weak references, every
model, dataset and Gram matrix of each pass while the next pass starts.
"""

from __future__ import annotations

import weakref
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import hfmerge
import hfmerge.engine.statistics as statistics_engine
from hfmerge.engine.statistics import (
    StatisticsCache,
    StatisticsRequest,
    pack_upper,
    packed_diagonal,
    symmetric_from_upper,
    symmetrize_upper_,
    unpack_gram,
)


def test_no_earlier_source_is_alive_when_the_next_statistics_pass_starts(digit_hub, tmp_path, monkeypatch):
    folders, datasets = digit_hub["folders"], digit_hub["datasets"]
    cache_init = StatisticsCache.__init__
    monkeypatch.setattr(StatisticsCache, "__init__",
                        lambda self, folder=None: cache_init(self, tmp_path / "stats"))  # an empty cache: every pass runs
    original = statistics_engine.collect_statistics
    watched: list[tuple[int, str, weakref.ref]] = []
    alive_at_start: list[list[str]] = []

    def watching(model, loader, request, **kwargs):
        alive_at_start.append([f"pass {i} {what}" for i, what, ref in watched if ref() is not None])
        result = original(model, loader, request, **kwargs)
        n = len(alive_at_start)
        watched.append((n, "model", weakref.ref(model)))
        watched.append((n, "dataset", weakref.ref(loader.dataset)))
        watched.extend((n, key, weakref.ref(tensor)) for key, tensor in result.items() if key.startswith("gram"))
        return result

    monkeypatch.setattr(statistics_engine, "collect_statistics", watching)
    # three distinct (model, data) pairs, so no pass is a cache hit
    sources = [str(folders["upright"]), str(folders["mirrored"]), str(folders["upright"])]
    data = [f"{datasets['digits']}:test", f"{datasets['digits-mirrored']}:test", f"{datasets['digits-mirrored']}:test"]
    result = hfmerge.merge(sources, method="regmean", data=data, samples=8, progress=False)

    assert len(alive_at_start) == 3
    assert sum(1 for _, what, _ in watched if what.startswith("gram_upper/")) >= 3  # the stage asks for them packed
    assert alive_at_start == [[], [], []]  # the accelerator, the stage's locals: none keeps a finished pass
    assert [f"pass {i} {what}" for i, what, ref in watched if ref() is not None] == []
    assert Path(result.staging).is_dir()


def test_reduction_completes_the_gram_matrices_in_place():
    """The pass hands over its running sums, made symmetric in place: no second copy of every Gram matrix."""

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.second = torch.nn.Linear(5, 3), torch.nn.Linear(3, 2)

        def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
            return self.second(torch.relu(self.first(pixel_values)))

    model = Model().double()
    x = torch.randn(7, 5, dtype=torch.float64)
    modules = dict(model.named_modules())
    state = statistics_engine._PassState(StatisticsRequest(grams=("first", "second")), modules,
                                         dict(model.named_parameters()), torch.device("cpu"))
    running = {name: gram.data_ptr() for name, gram in state.grams.items()}
    hooks = state.register_hooks(modules)
    state.run_batch(model, x, None, 0, 0)
    for hook in hooks:
        hook.remove()
    result = state.reduce(SimpleNamespace(num_processes=1, device=torch.device("cpu")))
    hidden = torch.relu(x @ model.first.weight.detach().T + model.first.bias.detach())
    torch.testing.assert_close(result["gram/first"], x.T @ x, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(result["gram/second"], hidden.T @ hidden, rtol=1e-12, atol=1e-12)
    assert {name: result[f"gram/{name}"].data_ptr() for name in running} == running
    assert state.grams == {}  # handed over, not kept beside the result


def test_a_packed_reduction_gives_each_gram_upper_triangle_only():
    """With ``packed`` the pass hands over each Gram's packed upper triangle (the stage's form), nothing whole."""
    model = torch.nn.Sequential(torch.nn.Linear(6, 4)).double()
    x = torch.randn(9, 6, dtype=torch.float64)
    modules = dict(model.named_modules())
    state = statistics_engine._PassState(StatisticsRequest(grams=("0",)), modules, dict(model.named_parameters()),
                                         torch.device("cpu"))
    hooks = state.register_hooks(modules)
    state.run_batch(lambda pixel_values: model(pixel_values), x, None, 0, 0)
    for hook in hooks:
        hook.remove()
    result = state.reduce(SimpleNamespace(num_processes=1, device=torch.device("cpu")), packed=True)
    assert not any(key.startswith("gram/") for key in result) and state.grams == {}
    torch.testing.assert_close(unpack_gram(result["gram_upper/0"]), x.T @ x, rtol=1e-12, atol=1e-12)


def test_symmetrize_upper_in_place_equals_the_full_matrix():
    x = torch.randn(11, 6, dtype=torch.float64)
    full = x.T @ x
    upper = torch.triu(full) + torch.tril(torch.randn(6, 6, dtype=torch.float64), diagonal=-1)  # junk below
    expected = symmetric_from_upper(upper)
    out = symmetrize_upper_(upper)
    assert out.data_ptr() == upper.data_ptr()
    torch.testing.assert_close(out, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("n", [1, 5, 255, 256, 300, 513])
def test_a_packed_upper_triangle_unpacks_to_the_symmetric_matrix(n):
    """Rows packed by row slices, unpacked a block of columns at a time (block edges at 256): exact."""
    x = torch.randn(n + 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    gram = x.T @ x
    gram = (gram + gram.T) / 2
    upper = torch.triu(gram)
    upper += torch.tril(torch.full_like(gram, float("nan")), -1)  # pack_upper must not read below the diagonal
    packed = pack_upper(upper)
    assert packed.shape == (n * (n + 1) // 2,)
    assert torch.equal(packed, gram[torch.ones(n, n, dtype=torch.bool).triu()])
    assert torch.equal(unpack_gram(packed), gram)
    assert torch.equal(packed[packed_diagonal(n)], torch.diagonal(gram))
