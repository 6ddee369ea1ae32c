"""RegMean's statistics: float32 Gram products summed in float64, packed in the cache, and the cache switch.

The float32 products are checked against float64 products of the same rows
with Higham's deterministic bound (the docstring of ``add_upper_gram_``):
|ΔGᵢⱼ| ≤ γ_K·√(GᵢᵢGⱼⱼ), γ_K = K·u / (1 − K·u), u = 2⁻²⁴, K the rows of one
batch. The merges with the cache written, read back, or off are equal bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_statistics import FC2, QKV, RandomImages
from torch.utils.data import DataLoader

import hfmerge
import hfmerge.engine.statistics as engine
from hfmerge.engine.statistics import (
    StatisticsCache,
    StatisticsRequest,
    add_upper_gram_,
    collect_statistics,
    symmetric_from_upper,
)
from hfmerge.testing.tiny import tiny_model

U32 = 2.0**-24


def test_a_batch_product_is_float32_and_its_sum_float64():
    x = torch.randn(50, 7, dtype=torch.float32, generator=torch.Generator().manual_seed(0))
    gram = torch.zeros(7, 7, dtype=torch.float64)
    add_upper_gram_(gram, x, block=3)
    add_upper_gram_(gram, x, block=3)
    exact = 2 * x.double().T @ x.double()
    assert gram.dtype == torch.float64
    torch.testing.assert_close(symmetric_from_upper(gram), exact, rtol=1e-5, atol=1e-5)
    assert not torch.equal(torch.triu(gram), torch.triu(exact))  # float32 products: their rounding shows
    assert torch.equal(gram[3:, :3], torch.zeros(4, 3, dtype=torch.float64))  # below the diagonal blocks: untouched


def test_float32_product_grams_match_float64_ones_within_the_rounding_bound(monkeypatch):
    model = tiny_model("vit")
    batch = 4
    loader = DataLoader(RandomImages(12, labeled=False), batch_size=batch)
    request = StatisticsRequest(grams=(QKV[0], FC2))
    float32 = collect_statistics(model, loader, request, progress=False)
    monkeypatch.setattr(engine, "gram_product_dtype", lambda dtype: torch.float64)
    float64 = collect_statistics(model, loader, request, progress=False)

    rows = batch * int(float32[f"rows/{FC2}"]) // 12  # rows of one batch: K
    gamma = rows * U32 / (1 - rows * U32)
    for name in request.grams:
        g32, g64 = float32[f"gram/{name}"], float64[f"gram/{name}"]
        assert g32.dtype == g64.dtype == torch.float64
        scale = torch.diagonal(g64).sqrt()
        relative = (g32 - g64).abs() / torch.outer(scale, scale)
        assert float(relative.max()) <= gamma, name
        assert float((g32 - g64).norm() / g64.norm()) <= 1e-5, name
        assert not torch.equal(g32, g64), name  # the products are float32: their rounding shows
        assert torch.equal(g32, g32.T), name


def test_the_cache_stores_each_gram_as_its_packed_upper_triangle(tmp_path):
    cache = StatisticsCache(tmp_path)
    request = StatisticsRequest(grams=(QKV[0], FC2))
    stats = collect_statistics(tiny_model("vit"), DataLoader(RandomImages(3), batch_size=2), request, progress=False)
    path = cache.path("model", "data", request)
    cache.save(path, stats)
    stored = load_file(path)
    assert not any(key.startswith("gram/") for key in stored)
    for name in request.grams:
        n = stats[f"gram/{name}"].shape[0]
        assert stored[f"gram_upper/{name}"].shape == (n * (n + 1) // 2,)
    table = cache.load(path)
    assert table is not None
    for key, tensor in stats.items():
        assert table.shape(key) == tuple(tensor.shape) and torch.equal(table.get(key), tensor), key


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc/self/maps")
def test_reading_the_cache_maps_no_file_into_memory(tmp_path):
    """Mapped cache pages would count in the merge's resident memory until its end (1 GiB per ViT-B source)."""
    cache = StatisticsCache(tmp_path)
    request = StatisticsRequest(grams=(FC2,))
    path = cache.path("model", "data", request)
    cache.save(path, collect_statistics(tiny_model("vit"), DataLoader(RandomImages(2), batch_size=2), request,
                                        progress=False))
    table = cache.load(path)
    assert table is not None and table.get(f"gram/{FC2}").shape == (64, 64)
    assert str(path) not in Path("/proc/self/maps").read_text()


def test_cache_settings_give_identical_merges(make_source, tmp_path, monkeypatch):
    """A cold cache, a warm cache and ``cache=false`` merge to the same tensors; ``cache=false`` writes nothing."""
    from test_every_method import random_images

    folder = tmp_path / "stats"
    init = StatisticsCache.__init__
    monkeypatch.setattr(StatisticsCache, "__init__", lambda self, f=None: init(self, folder))
    sources = [str(make_source("vit", 3, seed=1)), str(make_source("vit", 3, seed=2))]
    data = [str(random_images(tmp_path / "a")), str(random_images(tmp_path / "b", size=24))]

    def merged(**params) -> dict[str, torch.Tensor]:
        result = hfmerge.merge(sources, method="regmean", data=data, samples=4, progress=False, **params)
        return load_file(Path(result.staging) / "model.safetensors")

    off = merged(cache=False)
    assert not folder.exists() or not any(folder.iterdir())
    cold = merged()
    assert len(list(folder.glob("*.safetensors"))) == 2
    warm = merged(cache=True)
    assert off.keys() == cold.keys() == warm.keys()
    for key in off:
        assert torch.equal(off[key], cold[key]) and torch.equal(cold[key], warm[key]), key
