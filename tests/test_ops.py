"""The tensor maths of the methods, against hand computations (no Hub), and what makes an operation."""

from __future__ import annotations

import pytest
import torch

from hfmerge.engine.ops import Copy, LinearCombination, normalise
from hfmerge.methods.heads import ConcatHeads
from hfmerge.methods.layerwise import layer_weights
from hfmerge.methods.task_arithmetic import TaskArithmeticOp


def loader(tensors):
    reads = []

    def load(ref):
        reads.append(ref)
        return tensors[ref]

    load.reads = reads
    return load


def test_linear_combination_matches_hand_computation_and_skips_zero_weights():
    a = torch.tensor([1.0, 2.0, 3.0])
    b = torch.tensor([10.0, 20.0, 30.0])
    c = torch.tensor([100.0, 0.0, -5.0])
    load = loader({(0, "w"): a, (1, "w"): b, (2, "w"): c})
    out = LinearCombination(((0, "w"), (1, "w"), (2, "w")), (0.25, 0.75, 0.0)).apply(load)
    assert torch.equal(out, torch.tensor([7.75, 15.5, 23.25]))
    assert sorted(load.reads) == [(0, "w"), (1, "w")]  # the zero-weight source is never read


def test_linear_combination_computes_in_float32_for_half_inputs():
    a = torch.tensor([1.0, 2049.0], dtype=torch.float16)
    b = torch.tensor([2.0, 2051.0], dtype=torch.float16)
    out = LinearCombination(((0, "w"), (1, "w")), (0.5, 0.5)).apply(loader({(0, "w"): a, (1, "w"): b}))
    assert out.dtype == torch.float32
    assert out.tolist() == [1.5, 2050.0]


def test_task_arithmetic_is_base_plus_scaled_sum_of_task_vectors():
    base = torch.tensor([1.0, 1.0])
    t1 = torch.tensor([3.0, 1.0])
    t2 = torch.tensor([1.0, 5.0])
    load = loader({(2, "w"): base, (0, "w"): t1, (1, "w"): t2})
    out = TaskArithmeticOp((2, "w"), ((0, "w"), (1, "w")), 0.5).apply(load)
    # 1 + 0.5 * ((3-1) + (1-1)) = 2 ; 1 + 0.5 * ((1-1) + (5-1)) = 3
    assert out.tolist() == [2.0, 3.0]


def test_concat_heads_stacks_label_rows_and_averages_the_null_row():
    a = torch.tensor([[1.0, 1.0], [2.0, 2.0], [9.0, 9.0]])  # 2 labels + null
    b = torch.tensor([[3.0, 3.0], [7.0, 7.0]])  # 1 label + null
    load = loader({(0, "w"): a, (1, "w"): b})
    out = ConcatHeads(((0, "w"), (1, "w")), (2, 1), null_rows=1, null_weights=(0.5, 0.5)).apply(load)
    assert out.tolist() == [[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [8.0, 8.0]]


def test_concat_heads_without_null_rows_concatenates_biases():
    load = loader({(0, "b"): torch.tensor([1.0, 2.0]), (1, "b"): torch.tensor([3.0])})
    out = ConcatHeads(((0, "b"), (1, "b")), (2, 1)).apply(load)
    assert out.tolist() == [1.0, 2.0, 3.0]


def test_copy_returns_the_tensor_unchanged():
    t = torch.arange(4)
    assert torch.equal(Copy((1, "x")).apply(loader({(1, "x"): t})), t)


def test_normalise():
    assert normalise([1, 3]) == (0.25, 0.75)


def test_layer_weights_follow_eq1():
    # Np = 4 shared layers, M = 2 models: H^(j) = (4 - j) / (4 * 2)
    assert layer_weights(4, 2) == [3 / 8, 2 / 8, 1 / 8, 0.0]
    # M = 3: (Np - j) / (Np * 3)
    assert layer_weights(4, 3) == pytest.approx([3 / 12, 2 / 12, 1 / 12, 0.0])


def test_layer_weights_with_start_layer_are_uniform_then_decay_to_the_anchor():
    weights = layer_weights(6, 2, start_layer=3)
    assert weights[:2] == [0.5, 0.5]
    # the decay restarts at K = 3 over Np - K + 1 = 4 layers: (6 - j) / (4 * 2)
    assert weights[2:] == [3 / 8, 2 / 8, 1 / 8, 0.0]
    assert layer_weights(6, 2, start_layer=1) == layer_weights(6, 2)


def test_ties_trim_keeps_exactly_the_top_k_magnitudes_per_tensor():
    from hfmerge.methods.task_vectors import top_magnitude_threshold, trim_to_threshold

    task_vector = torch.randn(7, 13, generator=torch.Generator().manual_seed(0))
    for density in (0.05, 0.2, 0.5, 0.99):
        k = int(density * task_vector.numel())
        trimmed = trim_to_threshold(task_vector, top_magnitude_threshold(task_vector, density))
        expected = torch.zeros_like(task_vector).view(-1)
        keep = task_vector.abs().view(-1).argsort(descending=True)[:k]  # the k largest, by sorting
        expected[keep] = task_vector.view(-1)[keep]
        assert torch.equal(trimmed, expected.view_as(task_vector)), density
    assert torch.equal(trim_to_threshold(task_vector, top_magnitude_threshold(task_vector, 1.0)), task_vector)
    assert not trim_to_threshold(task_vector, top_magnitude_threshold(task_vector, 0.01)).any()  # k = 0


def test_aligned_average_moves_the_source_onto_the_anchor_neurons_then_averages():
    from hfmerge.methods.ot.alignment import AlignedAverage

    w_a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    w_b = torch.ones(3, 4)
    # source neuron a goes to anchor neuron perm[a]: M[a, perm[a]] = 1
    perm = [2, 0, 1]
    m = torch.zeros(3, 3, dtype=torch.float64)
    for a, j in enumerate(perm):
        m[a, j] = 1.0
    # input dimension in units of 2 entries: source unit 0 <-> anchor unit 1
    m_in = torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64)
    tables = {(0, "w"): w_a, (1, "w"): w_b, (2, "out"): m, (2, "in"): m_in}
    op = AlignedAverage(((0, "w"), (1, "w")), (((0, (2, "out"), 1), (1, (2, "in"), 2)), ()), (0.25, 0.75))
    moved = torch.empty(3, 4)
    for a, j in enumerate(perm):
        row = w_a[a]
        moved[j] = torch.cat([row[2:4], row[0:2]])
    torch.testing.assert_close(op.apply(tables.__getitem__), 0.25 * moved + 0.75 * w_b)


def test_aligned_average_into_fewer_neurons_takes_convex_combinations():
    from hfmerge.methods.ot.alignment import AlignedAverage

    w_a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])  # three source neurons
    m = torch.tensor([[1.0, 0.0], [0.0, 0.5], [0.0, 0.5]], dtype=torch.float64)  # columns sum to one
    op = AlignedAverage(((0, "w"),), (((0, (1, "m"), 1),),), (1.0,))
    expected = torch.tensor([[1.0, 2.0], [4.0, 5.0]])  # neuron 0, and the mean of neurons 1 and 2
    torch.testing.assert_close(op.apply({(0, "w"): w_a, (1, "m"): m}.__getitem__), expected)


def test_an_operation_defined_anywhere_is_planned_summarised_and_executed(tmp_path):
    """:class:`~hfmerge.engine.ops.MergeOp` is a protocol: a ``group`` and an ``apply`` make an operation."""
    from dataclasses import dataclass

    from safetensors.torch import load_file

    from hfmerge.engine.execute import execute_plan
    from hfmerge.engine.plan import MergePlan, TensorPlan

    @dataclass(frozen=True)
    class Negate:
        source: tuple[int, str]
        group: str = "negated"

        def apply(self, load):
            return -load(self.source).to(torch.float32)

    plan = MergePlan([TensorPlan("w", "w", (2, 3), torch.float32, Negate((0, "w"))),
                      TensorPlan("b", "b", (3,), torch.float32, Copy((0, "b")))])
    assert plan.summary() == [("negated", 1, 6), ("kept from anchor", 1, 3)]
    w, b = torch.randn(2, 3), torch.randn(3)
    execute_plan(plan, {0: {"w": w, "b": b}}, tmp_path, progress=False)
    written = load_file(tmp_path / "model.safetensors")
    assert torch.equal(written["w"], -w) and torch.equal(written["b"], b)
