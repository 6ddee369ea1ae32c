"""Layer similarity (vit-gating-merge §3.3, Eq. 4), the layers it gates, and its picture.

Expected values are computed here from the checkpoint files directly: each
block's tensors concatenated by their checkpoint keys (written out below, not
taken from hfmerge), pairwise cosines summed.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import weakref
import xml.etree.ElementTree as ET
from collections import Counter
from itertools import combinations
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from hfmerge.adapters import ModelLayout, inspect_source
from hfmerge.errors import IncompatibleModelsError, MergeNumericError, RecipeError
from hfmerge.hub.resolve import resolve_source
from hfmerge.methods.gating.similarity import (
    LayerSimilarity,
    gated_keys,
    layer_similarity,
    select_gated,
    similarity_svg,
    transformer_blocks,
)
from hfmerge.testing.tiny import save_tiny

LAYERS = 12
SVG = "{http://www.w3.org/2000/svg}"


def attention_keys(layer: int) -> list[str]:
    prefix = f"vit.encoder.layer.{layer}.attention."
    return [f"{prefix}{module}.{p}" for module in ("attention.query", "attention.key", "attention.value",
                                                   "output.dense") for p in ("weight", "bias")]


def mlp_keys(layer: int) -> list[str]:
    prefix = f"vit.encoder.layer.{layer}."
    return [f"{prefix}{module}.{p}" for module in ("intermediate.dense", "output.dense") for p in ("weight", "bias")]


def vit_config(layers: int = LAYERS, intermediate: int = 32) -> transformers.ViTConfig:
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=layers, num_attention_heads=2,
                                    intermediate_size=intermediate, image_size=8, patch_size=4, num_labels=3)
    config.architectures = ["ViTForImageClassification"]
    return config


def save_state(folder: Path, state: dict[str, torch.Tensor], config: transformers.ViTConfig) -> Path:
    model = transformers.ViTForImageClassification(config)
    model.load_state_dict(state)
    model.save_pretrained(folder)
    return folder


def perturbed(state: dict[str, torch.Tensor], seed: int, keys: list[str] | None = None,
              scale: float = 0.03) -> dict[str, torch.Tensor]:
    """``state`` plus noise: on every float tensor, or on ``keys`` (checkpoint keys) only.

    In-memory names of a ViT under transformers 5 differ from its checkpoint keys; a model
    saved with save_pretrained writes the keys, so ``keys`` are matched after a save/load round trip.
    """
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in state.items():
        noisy = keys is None or name in keys
        out[name] = tensor + scale * torch.randn(tensor.shape, generator=generator) if noisy else tensor.clone()
    return out


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny 12-layer ViTs fine-tuned (here: noised) from one shared initialisation, as the paper's sources are."""
    root = tmp_path_factory.mktemp("similarity")
    config = vit_config()
    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(config).state_dict()
    out = {}
    for k in range(3):
        out[f"task{k}"] = save_state(root / f"task{k}", perturbed(base, seed=k + 1, scale=0.01 * (k + 1)), config)
    # task0 again with layer 10's attention drowned in noise (10 sorts before 2 as text)
    saved = load_file(out["task0"] / "model.safetensors")
    noisy = perturbed(saved, seed=99, keys=attention_keys(10), scale=1.0)
    out["task0-attn10"] = copy_with_state(out["task0"], root / "task0-attn10", noisy)
    return out


def copy_with_state(folder: Path, to: Path, state: dict[str, torch.Tensor]) -> Path:
    """``folder``'s config with ``state`` (checkpoint keys) as its weights."""
    to.mkdir()
    (to / "config.json").write_text((folder / "config.json").read_text())
    save_file(state, to / "model.safetensors", metadata={"format": "pt"})
    return to


def layouts(*folders: Path) -> list[ModelLayout]:
    return [inspect_source(resolve_source(str(f))) for f in folders]


def hand_similarity(folders: list[Path], keys_of) -> list[float]:
    """Σ_{i<j} cos(vec_i, vec_j) per layer, vec = the block's tensors concatenated in float64."""
    states = [load_file(f / "model.safetensors") for f in folders]
    values = []
    for layer in range(LAYERS):
        vectors = [torch.cat([s[k].double().flatten() for k in keys_of(layer)]) for s in states]
        values.append(sum(float(torch.nn.functional.cosine_similarity(a, b, dim=0))
                          for a, b in combinations(vectors, 2)))
    return values


def test_layer_similarity_is_the_sum_of_pairwise_cosines_of_concatenated_blocks(folders):
    chosen = [folders["task0"], folders["task1"], folders["task2"]]
    similarity = layer_similarity(layouts(*chosen))
    assert similarity.pairs == 3
    assert similarity.attention == pytest.approx(hand_similarity(chosen, attention_keys), abs=1e-10)
    assert similarity.mlp == pytest.approx(hand_similarity(chosen, mlp_keys), abs=1e-10)
    # the noise grows with the task index, so the values are not all alike (the comparison above means something)
    assert max(similarity.attention) - min(similarity.attention) > 1e-3


def test_one_layer_perturbed_in_one_source_ranks_lowest_for_attention_and_leaves_mlp_alone(folders):
    unperturbed = layer_similarity(layouts(folders["task0"], folders["task1"], folders["task0"]))
    similarity = layer_similarity(layouts(folders["task0"], folders["task1"], folders["task0-attn10"]))
    assert min(range(LAYERS), key=lambda l: similarity.attention[l]) == 10
    assert select_gated(similarity, 1)[0] == (10,)
    assert similarity.attention[10] < unperturbed.attention[10] - 0.5
    others = [l for l in range(LAYERS) if l != 10]
    assert [similarity.attention[l] for l in others] == pytest.approx([unperturbed.attention[l] for l in others],
                                                                      abs=1e-12)
    assert similarity.mlp == pytest.approx(unperturbed.mlp, abs=1e-12)


def test_identical_sources_have_the_maximum_similarity_everywhere(folders):
    similarity = layer_similarity(layouts(*[folders["task1"]] * 4))
    assert similarity.pairs == 6
    assert similarity.attention == pytest.approx([6.0] * LAYERS, abs=1e-9)
    assert similarity.mlp == pytest.approx([6.0] * LAYERS, abs=1e-9)


def test_sources_of_different_shapes_are_refused_with_one_line(folders, tmp_path):
    torch.manual_seed(0)
    shallow = save_state(tmp_path / "shallow", transformers.ViTForImageClassification(vit_config(6)).state_dict(),
                         vit_config(6))
    wide = save_state(tmp_path / "wide", transformers.ViTForImageClassification(vit_config(intermediate=48))
                      .state_dict(), vit_config(intermediate=48))
    cases = {
        (folders["task0"], shallow): ["12 transformer layers", "has 6"],
        (folders["task0"], wide): ["vit.encoder.layer.0.intermediate.dense.weight", "[32, 16]", "[48, 16]"],
    }
    for pair, needles in cases.items():
        with pytest.raises(IncompatibleModelsError) as info:
            layer_similarity(layouts(*pair))
        assert "\n" not in str(info.value)
        for needle in needles:
            assert needle in str(info.value)
    with pytest.raises(IncompatibleModelsError, match="at least two"):
        layer_similarity(layouts(folders["task0"]))
    resnets = [save_tiny(tmp_path / f"resnet{k}", "resnet", seed=k) for k in range(2)]
    with pytest.raises(IncompatibleModelsError, match="0 attention and 0 MLP blocks"):
        layer_similarity(layouts(*resnets))


def test_non_finite_weights_are_reported(folders, tmp_path):
    state = load_file(folders["task1"] / "model.safetensors")
    state["vit.encoder.layer.3.intermediate.dense.weight"][0, 0] = float("nan")
    broken = copy_with_state(folders["task1"], tmp_path / "broken", state)
    with pytest.raises(MergeNumericError, match="layer 3's mlp"):
        layer_similarity(layouts(folders["task0"], broken))


# --- select_gated -----------------------------------------------------------------------------------------


def test_select_gated_takes_the_m_lowest_of_each_kind_sorted_by_layer():
    similarity = LayerSimilarity(attention=(2.5, 0.4, 2.9, 0.1, 1.0), mlp=(0.3, 2.0, 2.0, 2.8, 0.2), pairs=3)
    assert select_gated(similarity, 0) == ((), ())
    assert select_gated(similarity, 2) == ((1, 3), (0, 4))
    assert select_gated(similarity, 3) == ((1, 3, 4), (0, 1, 4))  # 1 and 2 tie for MLP: the lower layer wins
    assert select_gated(similarity, 5) == ((0, 1, 2, 3, 4), (0, 1, 2, 3, 4))


def test_select_gated_breaks_ties_by_the_lower_layer():
    similarity = LayerSimilarity(attention=(1.0, 1.0, 1.0, 1.0), mlp=(3.0, 1.0, 1.0, 0.5), pairs=3)
    assert select_gated(similarity, 2) == ((0, 1), (1, 3))


@pytest.mark.parametrize("m", [5, -1, 1.5, True])
def test_select_gated_refuses_m_outside_zero_to_the_layer_count(m):
    similarity = LayerSimilarity(attention=(1.0,) * 4, mlp=(1.0,) * 4, pairs=1)
    with pytest.raises(RecipeError) as info:
        select_gated(similarity, m)
    assert "maximum" in str(info.value) and "from 0 to 4" in str(info.value)
    assert "\n" not in str(info.value)


# --- streaming --------------------------------------------------------------------------------------------


class _Watch:
    """Tensors that came from a watched reader, and anything computed from them, while they live."""

    def __init__(self) -> None:
        self.live: dict[int, weakref.ref] = {}
        self.peak = 0
        self.live_at_read: list[int] = []

    def add(self, tensor: torch.Tensor) -> None:
        self.live[id(tensor)] = weakref.ref(tensor)
        self.measure()

    def live_tensors(self) -> list[torch.Tensor]:
        alive = [r() for r in self.live.values()]
        return [t for t in alive if t is not None]

    def measure(self) -> None:
        with torch._C.DisableTorchFunctionSubclass():
            storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.live_tensors()}
        self.peak = max(self.peak, sum(storages.values()))


WATCH = _Watch()


class _Watched(torch.Tensor):
    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        result = super().__torch_function__(func, types, args, kwargs or {})
        for item in result if isinstance(result, (tuple, list)) else (result,):
            if isinstance(item, _Watched):
                WATCH.add(item)
        return result


class _CountingReader:
    """A reader that counts reads and hands out watched tensors."""

    def __init__(self, inner, reads: Counter, label: str) -> None:
        self.inner, self.reads, self.label = inner, reads, label

    def get(self, key: str) -> torch.Tensor:
        with torch._C.DisableTorchFunctionSubclass():
            WATCH.live_at_read.append(sum(1 for t in WATCH.live_tensors() if t.numel() > 1))
        self.reads[(self.label, key)] += 1
        tensor = self.inner.get(key).as_subclass(_Watched)
        WATCH.add(tensor)
        return tensor


def _watched_run(folder_list: list[Path]) -> tuple[LayerSimilarity, Counter, int, list[int]]:
    global WATCH
    WATCH = _Watch()
    reads: Counter = Counter()
    sources = [dataclasses.replace(layout, reader=_CountingReader(layout.reader, reads, str(i)))
               for i, layout in enumerate(layouts(*folder_list))]
    return layer_similarity(sources), reads, WATCH.peak, WATCH.live_at_read


def test_similarity_streams_one_source_tensor_at_a_time_and_reads_each_twice(folders):
    two = [folders["task0"], folders["task1"]]
    five = [folders["task0"], folders["task1"], folders["task2"], folders["task0-attn10"], folders["task1"]]
    similarity, reads, peak_two, _ = _watched_run(two)
    assert similarity == layer_similarity(layouts(*two))  # watching changes nothing
    similarity, reads, peak_five, live_at_read = _watched_run(five)

    block_keys = {k for layer in range(LAYERS) for k in attention_keys(layer) + mlp_keys(layer)}
    assert {key for _, key in reads} == block_keys  # embeddings, norms and the classifier are never read
    assert set(reads.values()) == {2}  # one pass for the norms, one for the sum
    assert len(reads) == 5 * len(block_keys)
    # no tensor read before is still held when the next is read, so the peak is one tensor's, whatever N
    assert max(live_at_read) == 0
    largest = max(load_file(folders["task0"] / "model.safetensors")[k].nbytes for k in block_keys)
    # one source tensor (float32) and the float64 running sum it is added into; 64 bytes for scalar norms
    assert peak_five <= largest + 2 * largest + 64
    assert peak_five == peak_two


# --- the picture --------------------------------------------------------------------------------------------


def _markers(root: ET.Element, kind: str) -> dict[int, bool]:
    found = {}
    for element in root.iter():
        classes = (element.get("class") or "").split()
        if "marker" in classes and kind in classes:
            found[int(element.get("data-layer"))] = "gated" in classes
    return found


def test_similarity_svg_marks_exactly_the_gated_layers_and_labels_every_layer():
    attention = tuple(2.9 - 0.1 * l for l in range(LAYERS))  # falls with depth, as in Figure 3
    mlp = tuple(2.0 + 0.05 * l for l in range(LAYERS))
    similarity = LayerSimilarity(attention, mlp, pairs=3)
    gated = select_gated(similarity, 3)
    assert gated == ((9, 10, 11), (0, 1, 2))
    text = similarity_svg(similarity, gated)
    assert text == similarity_svg(similarity, gated)
    root = ET.fromstring(text)
    assert root.tag == f"{SVG}svg"
    assert _markers(root, "attention") == {l + 1: l in (9, 10, 11) for l in range(LAYERS)}
    assert _markers(root, "mlp") == {l + 1: l in (0, 1, 2) for l in range(LAYERS)}
    x_labels = [e.text for e in root.iter(f"{SVG}text") if e.get("class") == "x-label"]
    assert x_labels == [str(l) for l in range(1, LAYERS + 1)]
    y_labels = [e.text for e in root.iter(f"{SVG}text") if e.get("class") == "y-label"]
    # the axis spans from a round value below the lowest one (1.8; zoomed, as Figure 3 is) to N(N-1)/2
    assert y_labels[-1] == "3" and 1.4 < float(y_labels[0]) < 1.8
    # higher similarity is drawn higher up (smaller y)
    ys = [float(e.get("cy")) for e in root.iter(f"{SVG}circle")]
    assert ys == sorted(ys)
    assert "<script" not in text and "href" not in text and "@import" not in text
    assert similarity_svg(similarity, ((), ())) != text
    assert not any(_markers(ET.fromstring(similarity_svg(similarity, ((), ()))), "mlp").values())


def test_similarity_svg_refuses_a_gated_layer_that_does_not_exist():
    similarity = LayerSimilarity((1.0, 2.0), (1.0, 2.0), pairs=1)
    with pytest.raises(ValueError, match="layer 2"):
        similarity_svg(similarity, ((2,), ()))


# --- blocks and keys ------------------------------------------------------------------------------------------


def test_blocks_follow_the_layers_in_forward_order_and_gated_keys_name_their_checkpoint_tensors(folders):
    layout = layouts(folders["task0"])[0]
    blocks = transformer_blocks(layout)
    assert [(b.layer, b.kind) for b in blocks] == [(l, k) for l in range(LAYERS) for k in ("attention", "mlp")]
    assert [[layout.tensors[n].key for n in b.tensors] for b in blocks[20:22]] == [attention_keys(10), mlp_keys(10)]
    # MLP 0 runs before attention 10; within a block, the checkpoint's module order
    assert gated_keys(layout, ((10,), (0,))) == tuple(mlp_keys(0) + attention_keys(10))
    assert gated_keys(layout, ((), ())) == ()
    with pytest.raises(ValueError, match="mlp layer 12"):
        gated_keys(layout, ((), (12,)))


def test_importing_the_analysis_loads_neither_torch_nor_transformers():
    """The gating method imports it at module level, and `hfmerge methods` must stay light (test_imports)."""
    probe = ("import sys, hfmerge.methods.gating.similarity; "
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
