"""Cross-layer alignment (CLAFusion §3.1) and layer balancing (§3.2), as pure maths and per family.

The paper's toy mapping (Figure 2) and the MLP mappings of Table 9 are reproduced;
the dynamic programming of Algorithm 1 agrees with brute force over every strictly
increasing map; linear CKA (Eq. 2) agrees with the centring-matrix formula;
adding layers preserves the function of an MLP, a VGG-style CNN and ResNets with
basic and bottleneck blocks, and the activations computed for the balanced model
are the ones it produces.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import transformers

from hfmerge import cross_layer_alignment
from hfmerge.adapters import family_for_model_type
from hfmerge.adapters.depth import Structure
from hfmerge.methods.ot.balancing import deepen, deepened_activations, merge_linear, relu_estimate
from hfmerge.methods.ot.cross_layer import cka_costs, linear_cka, width_costs
from hfmerge.modeling.classic import (
    HfMergeMLPConfig,
    HfMergeVGGConfig,
    MLPForImageClassification,
    VGGForImageClassification,
)
from hfmerge.testing.tiny import randomise_batch_norms


def _one_based(mapping):
    return [j + 1 for j in mapping]


def test_the_papers_toy_example():
    """Figure 2: widths 5, 4, 3, 1 against 3, 2, 1, squared difference of neuron counts → a = (1, 3, 4)."""
    cost = width_costs([5, 4, 3, 1], [3, 2, 1])
    assert cost.tolist()[2] == [0.0, 1.0, 4.0]  # A's layer of 3 neurons against B's of 3, 2, 1
    assert _one_based(cross_layer_alignment(cost)) == [1, 3, 4]


def test_table_9_mlp_mappings_with_and_without_the_constraints():
    """Appendix C, Table 9, neuron counts: A = 400, 200, 100, 50, 25 and B = 400, 200, 100."""
    cost = width_costs([400, 200, 100, 50, 25], [400, 200, 100])
    assert _one_based(cross_layer_alignment(cost)) == [1, 2, 5]  # both constraints
    assert _one_based(cross_layer_alignment(cost, first_last=False)) == [1, 2, 3]  # none


def _total(cost, mapping):
    return sum(float(cost[j, i]) for i, j in enumerate(mapping))


@pytest.mark.parametrize("seed", range(40))
def test_dynamic_programming_agrees_with_brute_force(seed):
    generator = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 7, (1,), generator=generator))
    n = int(torch.randint(1, m + 1, (1,), generator=generator))
    cost = torch.rand(m, n, generator=generator, dtype=torch.float64)
    if seed % 4 == 0:  # integer costs, where ties are many
        cost = torch.randint(0, 3, (m, n), generator=generator).double()
    maps = list(itertools.combinations(range(m), n))
    for first_last in (True, False):
        allowed = [a for a in maps if not first_last or (a[0] == 0 and (n == 1 or a[-1] == m - 1))]
        best = min(_total(cost, a) for a in allowed)
        found = cross_layer_alignment(cost, first_last=first_last)
        assert tuple(found) in allowed, (found, first_last)
        assert _total(cost, found) == pytest.approx(best, abs=1e-12)


def test_one_shallow_layer_takes_the_first():
    """n = 1: the paper prioritises the first hidden layer over the last."""
    assert cross_layer_alignment(torch.tensor([[5.0], [0.0], [1.0]])) == [0]
    assert cross_layer_alignment(torch.tensor([[5.0], [0.0], [1.0]]), first_last=False) == [1]


@pytest.mark.parametrize("cost, message", [
    (torch.zeros(2, 3), "m = 2 < n = 3"),
    (torch.tensor([[0.0, float("nan")], [1.0, 1.0]]), "NaN"),
    (torch.zeros(3), "m x n matrix"),
    (torch.zeros(3, 0), "m x n matrix"),
])
def test_bad_costs_are_refused(cost, message):
    with pytest.raises(ValueError, match=message):
        cross_layer_alignment(cost)


def test_linear_cka_against_the_centring_matrix_formula():
    """Eq. 2 with H = I − 11ᵀ/t, in both product orders, and its invariances."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 7, generator=generator, dtype=torch.float64)
    y = x @ torch.randn(7, 5, generator=generator, dtype=torch.float64) + 0.3 * torch.randn(30, 5, generator=generator,
                                                                                         dtype=torch.float64)
    h = torch.eye(30, dtype=torch.float64) - torch.full((30, 30), 1 / 30, dtype=torch.float64)
    xh, yh = h @ x, h @ y
    expected = float(torch.linalg.norm(yh.T @ xh) ** 2 / (torch.linalg.norm(xh.T @ xh) * torch.linalg.norm(yh.T @ yh)))
    assert linear_cka(x, y) == pytest.approx(expected, rel=1e-12)
    wide = torch.randn(30, 50, generator=generator, dtype=torch.float64)  # features outnumber samples: Gram form
    expected_wide = float(torch.linalg.norm((h @ wide).T @ xh) ** 2
                          / (torch.linalg.norm(xh.T @ xh) * torch.linalg.norm((h @ wide).T @ (h @ wide))))
    assert linear_cka(x, wide) == pytest.approx(expected_wide, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=generator, dtype=torch.float64))
    assert linear_cka(x, 3.0 * x @ q + 1.0) == pytest.approx(1.0, abs=1e-12)  # rotation, scale, shift
    assert linear_cka(x, torch.ones(30, 4)) == 0.0  # a constant layer (an added zero block) matches nothing
    costs = cka_costs([x, y], [x])
    assert costs.shape == (2, 1) and float(costs[0, 0]) == pytest.approx(0.0, abs=1e-12)


def test_merge_linear_and_the_relu_estimates_by_hand():
    z = torch.tensor([[1.0, -2.0, 0.5], [-3.0, -1.0, 0.5], [1.0, 4.0, -0.1]])  # t = 3 samples, 3 neurons
    assert relu_estimate(z, "sign_of_sum").tolist() == [0.0, 1.0, 1.0]  # sums -1, 1, 0.9
    assert relu_estimate(z, "majority_vote").tolist() == [1.0, 0.0, 1.0]  # 2, 1, 2 of 3 samples ≥ 0
    assert relu_estimate(z, "average_of_sign").tolist() == pytest.approx([2 / 3, 1 / 3, 2 / 3])
    w1, b1 = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]), torch.tensor([1.0, -1.0, 2.0])
    w2, b2 = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([0.5])
    weight, bias = merge_linear((w1, b1), (w2, b2), torch.tensor([1.0, 0.0, 1.0]))
    # W2 D W1 = [1 0 -1] applied to rows 1 and 3 of W1: [1 - 5, 2 - 6]; b = W2 D b1 + b2 = 1 - 2 + 0.5
    assert weight.tolist() == [[-4.0, -4.0]] and bias.tolist() == [-0.5]
    x = torch.tensor([[3.0, -1.0]])  # an input whose pattern D matches: W1 x + b1 = [2, 4, 11] → all ≥ 0 but D
    exact = (torch.relu(x.double() @ w1.double().T + b1) * torch.tensor([1.0, 0.0, 1.0])) @ w2.double().T + b2
    assert torch.allclose(x.double() @ weight.T + bias, exact)


def _models():
    torch.manual_seed(0)
    yield "mlp", MLPForImageClassification(HfMergeMLPConfig(image_size=8, hidden_sizes=[16, 12, 10],
                                                            num_labels=3)).eval(), [[0, 2, 4]], [5], 8
    yield "vgg", randomise_batch_norms(VGGForImageClassification(HfMergeVGGConfig(
        image_size=16, layers=[8, 8, "M", 12, 12, "M", 6], num_labels=3))), [[0, 3], [0, 2], [0]], [4, 3, 2], 16
    for layer_type in ("basic", "bottleneck"):
        config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[2, 2],
                                           layer_type=layer_type, num_labels=3)
        yield (f"resnet-{layer_type}", randomise_batch_norms(transformers.ResNetForImageClassification(config)),
               [[0, 2], [0, 3]], [3, 4], 32)


@pytest.mark.parametrize("name, model, mappings, lengths, size", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_adding_layers_preserves_the_function(name, model, mappings, lengths, size):
    """§3.2: the deepened model gives the same logits on random (also negative) inputs, to 1e-5."""
    spec = family_for_model_type(model.config.model_type).depth
    deepened = deepen(model, spec, mappings, lengths)
    assert [len(s.layers) for s in deepened.segments] == lengths
    assert sum(p.numel() for p in deepened.model.parameters()) > sum(p.numel() for p in model.parameters())
    pixels = torch.randn(6, 3, size, size, generator=torch.Generator().manual_seed(1)) * 2.0
    with torch.no_grad():
        torch.testing.assert_close(deepened.model(pixels).logits, model(pixels).logits, atol=1e-5, rtol=1e-5)
    # the kept layers sit where the mapping puts them, with their own weights
    kept = {m for s in deepened.segments for j, layer in enumerate(s.layers) if deepened.original_name(layer.modules[0])
            for m in layer.modules}
    assert len(kept) == sum(len(l.modules) for s in spec.segments(Structure.of_model(model)) for l in s.layers)


@pytest.mark.parametrize("name, model, mappings, lengths, size", list(_models()), ids=lambda v: v if isinstance(v, str) else "")
def test_activations_of_the_deepened_model_come_from_the_original(name, model, mappings, lengths, size):
    """What OTFusion compares for the balanced model equals what the balanced model computes."""
    spec = family_for_model_type(model.config.model_type).depth
    deepened = deepen(model, spec, mappings, lengths)
    pixels = torch.randn(5, 3, size, size, generator=torch.Generator().manual_seed(2))

    def observed(net):  # every normalisation and linear output, a VGG's ReLUs, ResNet blocks' streams
        names = [n for n, m in net.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.BatchNorm2d))
                 and not n.startswith("classifier")]
        names += [n for n, m in net.named_modules() if n.startswith("features.") and isinstance(m, torch.nn.ReLU)]
        blocks = [n for n, m in net.named_modules() if type(m).__name__ in ("ResNetBasicLayer", "ResNetBottleNeckLayer")]
        return names + [f"{n}.activation#input" for n in blocks] + [f"{n}.activation" for n in blocks]

    def record(net, names):
        seen, hooks = {}, []
        lookup = dict(net.named_modules())
        for n in names:
            def hook(_m, args, out, n=n):
                seen[n] = (args[0] if n.endswith("#input") else out).detach().clone()

            hooks.append(lookup[n.removesuffix("#input")].register_forward_hook(hook))
        with torch.no_grad():
            net(pixels)
        for h in hooks:
            h.remove()
        return seen

    modules = observed(deepened.model)
    assert any(m.endswith("#input") for m in modules) == name.startswith("resnet")
    actual = record(deepened.model, modules)
    originals = record(model, observed(model))
    derived = deepened_activations(deepened, spec, modules, originals.__getitem__)
    for module in modules:
        torch.testing.assert_close(derived[module], actual[module], atol=1e-5, rtol=1e-5, msg=module)
