"""The statistics engine: Gram matrices, diagonal Fisher and activations against hand computations.

Each expected value is computed here from the model directly (its own forward
hooks, its own autograd loop), independently of ``hfmerge.engine.statistics``.
"""

from __future__ import annotations

import os
import runpy
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from hfmerge.engine.statistics import (
    StatisticsCache,
    StatisticsRequest,
    add_upper_gram_,
    collect_statistics,
    symmetric_from_upper,
)
from hfmerge.errors import StatisticsError
from hfmerge.testing.ports import free_port
from hfmerge.testing.tiny import tiny_model

QKV = tuple(f"vit.layers.0.attention.{p}" for p in ("q_proj", "k_proj", "v_proj"))
FC2 = "vit.layers.1.mlp.fc2"


class RandomImages(Dataset):
    """``n`` seeded random images of ``size`` px with labels in [0, classes)."""

    def __init__(self, n: int, size: int = 16, classes: int = 3, seed: int = 0, labeled: bool = True) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.pixels = torch.randn(n, 3, size, size, generator=generator)
        self.labels = torch.randint(0, classes, (n,), generator=generator)
        self.labeled = labeled

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        item = {"pixel_values": self.pixels[i]}
        if self.labeled:
            item["labels"] = self.labels[i]
        return item


def _inputs_of(model: torch.nn.Module, names: list[str], pixels: torch.Tensor) -> dict[str, list[torch.Tensor]]:
    """Each module's inputs when ``model`` runs ``pixels``, recorded by the test's own hooks."""
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_hook(lambda m, a, o, n=n: seen[n].append(a[0].detach().clone()))
               for n in names]
    with torch.no_grad():
        model.eval()(pixel_values=pixels)
    for handle in handles:
        handle.remove()
    return seen


def test_gram_is_xtx_of_the_recorded_input_in_float64_with_row_counts():
    """Within float32's rounding of one batch's products (Higham's γ_K, K the rows of a batch of 3)."""
    model = tiny_model("vit")
    data = RandomImages(7)
    stats = collect_statistics(model, DataLoader(data, batch_size=3), StatisticsRequest(grams=(QKV[0], FC2)),
                               progress=False)
    seen = _inputs_of(model, [QKV[0], FC2], data.pixels)
    gamma = 3 * 17 * 2.0**-24 / (1 - 3 * 17 * 2.0**-24)
    for name in (QKV[0], FC2):
        x = seen[name][0].to(torch.float64)
        x = x.reshape(-1, x.shape[-1])
        exact = x.T @ x
        scale = torch.diagonal(exact).sqrt()
        assert stats[f"gram/{name}"].dtype == torch.float64
        assert float(((stats[f"gram/{name}"] - exact).abs() / torch.outer(scale, scale)).max()) <= gamma
        assert int(stats[f"rows/{name}"]) == 7 * 17  # 16 patches + the class token per image
    assert stats["gram/" + FC2].shape == (64, 64)
    assert int(stats["samples"]) == 7


@pytest.mark.parametrize("block", [3, 4, 10, 64])
def test_blockwise_upper_gram_completes_to_xtx(block):
    x = torch.randn(37, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    gram = torch.zeros(10, 10, dtype=torch.float64)
    add_upper_gram_(gram, x, block)
    add_upper_gram_(gram, 2 * x, block)
    torch.testing.assert_close(symmetric_from_upper(gram), 5 * (x.T @ x), rtol=1e-12, atol=1e-12)


def test_q_k_and_v_read_one_input_so_share_one_gram():
    stats = collect_statistics(tiny_model("vit"), DataLoader(RandomImages(4), batch_size=2),
                               StatisticsRequest(grams=QKV), progress=False)
    assert torch.equal(stats[f"gram/{QKV[0]}"], stats[f"gram/{QKV[1]}"])
    assert torch.equal(stats[f"gram/{QKV[0]}"], stats[f"gram/{QKV[2]}"])
    assert stats[f"gram/{QKV[0]}"].abs().sum() > 0


FISHER_PARAMS = ("classifier.weight", "classifier.bias", "vit.layers.0.mlp.fc1.weight", "vit.embeddings.cls_token")


def _hand_fisher(model: torch.nn.Module, pixels: torch.Tensor, labels: list[int]) -> dict[str, torch.Tensor]:
    """Σₙ (∂ log p(yₙ|xₙ)/∂θ)², one sample at a time, in float64."""
    params = dict(model.named_parameters())
    total = {n: torch.zeros(params[n].shape, dtype=torch.float64) for n in FISHER_PARAMS}
    model.eval()
    for x, y in zip(pixels, labels):
        model.zero_grad()
        torch.log_softmax(model(pixel_values=x[None]).logits[0], -1)[y].backward()
        for n in FISHER_PARAMS:
            total[n] += params[n].grad.to(torch.float64) ** 2
    model.zero_grad()
    return total


def test_empirical_fisher_equals_a_hand_loop_of_per_sample_squared_gradients():
    model = tiny_model("vit")
    data = RandomImages(5)
    stats = collect_statistics(model, DataLoader(data, batch_size=2),
                               StatisticsRequest(fisher=FISHER_PARAMS, fisher_labels="empirical"), progress=False)
    expected = _hand_fisher(model, data.pixels, data.labels.tolist())
    for name in FISHER_PARAMS:
        assert stats[f"fisher/{name}"].dtype == torch.float64
        torch.testing.assert_close(stats[f"fisher/{name}"], expected[name], rtol=1e-5, atol=1e-12)
    assert int(stats["samples"]) == 5


def test_model_sampled_fisher_follows_the_documented_seeded_draw():
    model = tiny_model("vit")
    data = RandomImages(5, labeled=False)
    stats = collect_statistics(model, DataLoader(data, batch_size=2), StatisticsRequest(fisher=FISHER_PARAMS),
                               seed=3, progress=False)
    # The documented rule: sample n's label ~ softmax(logits_n), drawn by torch.multinomial with a generator
    # seeded (seed * 0x9E3779B97F4A7C15 + n) mod 2^63.
    with torch.no_grad():
        probs = torch.softmax(model.eval()(pixel_values=data.pixels).logits.double(), -1)
    labels = [int(torch.multinomial(probs[n], 1, generator=torch.Generator().manual_seed(
        (3 * 0x9E3779B97F4A7C15 + n) % 2**63))) for n in range(5)]
    expected = _hand_fisher(model, data.pixels, labels)
    for name in FISHER_PARAMS:
        torch.testing.assert_close(stats[f"fisher/{name}"], expected[name], rtol=1e-4, atol=1e-12)
    other = collect_statistics(model, DataLoader(data, batch_size=5), StatisticsRequest(fisher=FISHER_PARAMS),
                               seed=3, progress=False)  # other batching, same draws
    torch.testing.assert_close(other["fisher/classifier.weight"], stats["fisher/classifier.weight"])


def test_fisher_refuses_a_segmentation_model_and_empirical_without_labels():
    seg = tiny_model("segformer")
    with pytest.raises(StatisticsError, match="image classifier"):
        collect_statistics(seg, DataLoader(RandomImages(2, size=32), batch_size=2),
                           StatisticsRequest(fisher=("decode_head.classifier.weight",)), progress=False)
    with pytest.raises(StatisticsError, match="labels"):
        collect_statistics(tiny_model("vit"), DataLoader(RandomImages(2, labeled=False), batch_size=2),
                           StatisticsRequest(fisher=("classifier.bias",), fisher_labels="empirical"), progress=False)


def test_activations_of_the_first_t_samples_in_data_order():
    model = tiny_model("vit")
    data = RandomImages(7)
    stats = collect_statistics(model, DataLoader(data, batch_size=3),
                               StatisticsRequest(activations=("vit.layers.0.mlp.fc1", "classifier"),
                                                 activation_samples=5), progress=False)
    with torch.no_grad():
        logits = model(pixel_values=data.pixels).logits
    assert stats["activation/classifier"].shape == (5, 3)
    torch.testing.assert_close(stats["activation/classifier"], logits[:5])
    assert stats["activation/vit.layers.0.mlp.fc1"].shape == (5, 17, 64)
    fc1_input = _inputs_of(model, ["vit.layers.0.mlp.fc1"], data.pixels[:5])["vit.layers.0.mlp.fc1"][0]
    fc1 = dict(model.named_modules())["vit.layers.0.mlp.fc1"]
    with torch.no_grad():
        torch.testing.assert_close(stats["activation/vit.layers.0.mlp.fc1"], fc1(fc1_input))


def test_convolution_activations_are_pooled_to_at_most_pool_squared_positions():
    """A [B, C, 8, 8] output pooled to 2 x 2 is the mean of each 4 x 4 quadrant; smaller maps and tokens are kept."""
    model = tiny_model("resnet")
    data = RandomImages(4, size=32)
    stem, stage = "resnet.embedder", "resnet.encoder.stages.1.layers.0.layer.1.normalization"
    whole = collect_statistics(model, DataLoader(data, batch_size=3),
                               StatisticsRequest(activations=(stem, stage), activation_samples=4), progress=False)
    pooled = collect_statistics(model, DataLoader(data, batch_size=3),
                                StatisticsRequest(activations=(stem, stage), activation_samples=4, activation_pool=2),
                                progress=False)
    full = whole[f"activation/{stem}"]
    assert full.shape[2:] == (8, 8) and pooled[f"activation/{stem}"].shape == (*full.shape[:2], 2, 2)
    quadrant = full[:, :, 4:, :4].mean(dim=(2, 3))
    torch.testing.assert_close(pooled[f"activation/{stem}"][:, :, 1, 0], quadrant)
    assert whole[f"activation/{stage}"].shape[2:] == (4, 4)
    request = StatisticsRequest(activations=(stem,), activation_samples=4)
    assert request.cache_key() != StatisticsRequest(activations=(stem,), activation_samples=4,
                                                    activation_pool=2).cache_key()


def test_eval_mode_during_the_pass_and_training_flag_restored():
    model = tiny_model("vit")
    model.config.hidden_dropout_prob = 0.5
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.5
    model.train()
    loader = DataLoader(RandomImages(4), batch_size=2)
    first = collect_statistics(model, loader, StatisticsRequest(grams=(FC2,)), progress=False)
    second = collect_statistics(model, loader, StatisticsRequest(grams=(FC2,)), progress=False)
    assert torch.equal(first[f"gram/{FC2}"], second[f"gram/{FC2}"])  # no dropout noise
    assert model.training


def _hook_counts(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_hooks_are_removed_after_the_pass_and_after_an_error():
    model = tiny_model("vit")
    request = StatisticsRequest(grams=QKV, activations=("classifier",), activation_samples=2)
    before = _hook_counts(model)
    collect_statistics(model, DataLoader(RandomImages(2), batch_size=2), request, progress=False)
    assert _hook_counts(model) == before

    def failing():
        yield {"pixel_values": torch.randn(2, 3, 16, 16)}
        raise RuntimeError("a broken image")

    model.train()
    with pytest.raises(RuntimeError, match="broken image"):
        collect_statistics(model, failing(), request, progress=False)
    assert _hook_counts(model) == before
    assert model.training


def test_no_samples_is_an_error():
    with pytest.raises(StatisticsError, match="no sample"):
        collect_statistics(tiny_model("vit"), DataLoader(RandomImages(0), batch_size=2),
                           StatisticsRequest(grams=(FC2,)), progress=False)


def test_cache_round_trip_and_key_stability(tmp_path):
    cache = StatisticsCache(tmp_path / "stats")
    request = StatisticsRequest(grams=(QKV[0], FC2), fisher=("classifier.weight",))
    path = cache.path("sha-a", "data-1", request)
    assert cache.load(path) is None
    assert path == cache.path("sha-a", "data-1", StatisticsRequest(grams=(FC2, QKV[0]), fisher=("classifier.weight",)))
    others = {
        cache.path("sha-b", "data-1", request),
        cache.path("sha-a", "data-2", request),
        cache.path("sha-a", "data-1", StatisticsRequest(grams=(FC2,), fisher=("classifier.weight",))),
        cache.path("sha-a", "data-1", StatisticsRequest(grams=(QKV[0], FC2), fisher=("classifier.weight",),
                                                        fisher_labels="empirical")),
        cache.path("sha-a", "data-1", request, seed=1),  # model-drawn labels: the seed changes the result
    }
    assert path not in others and len(others) == 5
    grams_only = StatisticsRequest(grams=(FC2,))
    assert cache.path("m", "d", grams_only, seed=1) == cache.path("m", "d", grams_only, seed=2)  # no draw, no seed

    stats = collect_statistics(tiny_model("vit"), DataLoader(RandomImages(3), batch_size=2), request, progress=False)
    cache.save(path, stats)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    reader = cache.load(path)
    assert reader is not None and set(reader.keys()) == set(stats) | {f"gram_upper/{g}" for g in request.grams}
    for key, tensor in stats.items():
        assert torch.equal(reader.get(key), tensor), key
    assert StatisticsCache().folder == Path(os.environ["HF_HOME"]) / "hfmerge" / "statistics"


_TWO_PROCESS_SCRIPT = '''
import sys
import torch
from torch.utils.data import DataLoader, Dataset

from hfmerge.engine.statistics import StatisticsRequest, collect_statistics


class TokenClassifier(torch.nn.Module):
    """Patches -> two token-wise linears (3-d inputs: rows are tokens) -> mean -> classifier.

    Plain torch, so the two worker processes need not import transformers.
    """

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.patch = torch.nn.Conv2d(3, 8, 4, stride=4)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 8)
        self.classifier = torch.nn.Linear(8, 3)

    def forward(self, pixel_values):
        tokens = self.patch(pixel_values).flatten(2).transpose(1, 2)
        return self.classifier(self.fc2(torch.relu(self.fc1(tokens))).mean(1))


class Images(Dataset):
    def __init__(self):
        self.pixels = torch.randn(11, 3, 16, 16, generator=torch.Generator().manual_seed(5))

    def __len__(self):
        return len(self.pixels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixels[i]}


def build():
    request = StatisticsRequest(
        grams=("fc1", "fc2"), fisher=("classifier.weight", "fc1.weight", "patch.bias"),
        activations=("classifier", "fc1"), activation_samples=6,
    )
    return TokenClassifier(), DataLoader(Images(), batch_size=2), request


if __name__ == "__main__":
    from accelerate import Accelerator
    from safetensors.torch import save_file

    accelerator = Accelerator()
    model, loader, request = build()
    stats = collect_statistics(model, loader, request, accelerator=accelerator, seed=7, progress=False)
    assert accelerator.num_processes == 2
    save_file(stats, sys.argv[1] + f".{accelerator.process_index}")
    accelerator.end_training()  # a gloo group left to the interpreter's exit can abort the process
'''


def test_two_processes_under_accelerate_launch_equal_one_process(tmp_path):
    """11 samples in batches of 2 over 2 processes: the last round is uneven, and nothing is counted twice."""
    from safetensors.torch import load_file

    script = tmp_path / "two_processes.py"
    script.write_text(textwrap.dedent(_TWO_PROCESS_SCRIPT))
    executable = Path(sys.executable).parent / "accelerate"
    launcher = [str(executable)] if executable.exists() else [sys.executable, "-m",
                                                               "accelerate.commands.accelerate_cli"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "home"), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()),
         str(script), str(tmp_path / "stats")],
        capture_output=True, text=True, timeout=180, env=env, cwd=tmp_path, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    build = runpy.run_path(str(script))["build"]
    model, loader, request = build()
    one = collect_statistics(model, loader, request, seed=7, progress=False)
    assert int(one["samples"]) == 11
    for rank in (0, 1):
        two = load_file(str(tmp_path / f"stats.{rank}"))
        assert set(two) == set(one)
        for key, tensor in one.items():
            assert two[key].dtype == tensor.dtype, key
            torch.testing.assert_close(two[key], tensor, rtol=1e-5, atol=1e-8, msg=key)
