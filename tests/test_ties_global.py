"""TIES with the paper's own trim (``trim=global``): the top density fraction of each whole task vector.

The expectation is written from the official code's rule (prateeky2806/ties-merging,
``topk_values_mask`` over ``state_dict_to_vector``): flatten every task-vector
tensor of a source into one vector of d entries, m = d − int(density·d), keep
the entries whose magnitude is at least the m-th smallest; then elect signs and
take the disjoint mean. All of it here in float64, from the models loaded with
plain transformers.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import run_cli

import hfmerge
from hfmerge.methods.task_vectors import DisjointMerge, global_trim_thresholds


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def is_task_vector(name, value):
    """Every floating tensor but BatchNorm statistics: all are task vectors when base and sources share labels."""
    return value.dtype.is_floating_point and not name.endswith(("running_mean", "running_var"))


def global_ties_by_hand(base, tasks, density, scale):
    """{name: merged tensor} for the task-vector tensors, trimmed over the whole model as the paper's code does."""
    names = sorted(n for n, v in base.items() if is_task_vector(n, v))  # state_dict_to_vector sorts the keys
    trimmed, kept = [], []
    for task in tasks:
        # τ as the merge computes it (float32), then float64 for everything after
        tau = torch.cat([(task[n].float() - base[n].float()).double().flatten() for n in names])
        d = tau.numel()
        m = d - int(d * density)
        threshold = torch.sort(tau.abs()).values[m - 1]  # the m-th smallest: kthvalue(m)
        mask = tau.abs() >= threshold
        kept.append(int(mask.sum()))
        trimmed.append(tau * mask)
    stacked = torch.stack(trimmed)
    elected = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == elected) & (stacked != 0)
    mean = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    merged, offset = {}, 0
    for n in names:
        size = base[n].numel()
        merged[n] = (base[n].double().flatten() + scale * mean[offset:offset + size]).reshape(base[n].shape)
        offset += size
    return merged, kept, sum(base[n].numel() for n in names)


@pytest.mark.parametrize("family", ["vit", "resnet"])
def test_global_trim_matches_the_papers_code_by_hand_and_differs_from_the_per_tensor_trim(family, make_source,
                                                                                           tmp_path):
    base = make_source(family, seed=0)
    tasks = [make_source(family, seed=s) for s in (1, 2, 3)]
    result = hfmerge.merge([str(t) for t in tasks], method="ties", base=str(base), lambda_=0.7,
                           parameters={"density": 0.3, "trim": "global"}, progress=False)
    merged = load_plain(result.save(tmp_path / "global")).state_dict()
    sb = load_plain(base).state_dict()
    states = [load_plain(t).state_dict() for t in tasks]
    expected, kept, entries = global_ties_by_hand(sb, states, 0.3, 0.7)
    assert result.details["trim_entries"] == entries and result.details["trim_kept"] == kept
    assert kept == [int(entries * 0.3) + 1] * 3  # the paper's kthvalue keeps one more than ⌊density·d⌋
    for name, value in merged.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, states[0][name]), name
        elif name in expected:  # float32 output of a float64 expectation: 1e-6 is rounding, not a kept entry
            torch.testing.assert_close(value.double(), expected[name], rtol=0, atol=1e-6, msg=name)
        else:  # BatchNorm statistics: averaged
            torch.testing.assert_close(value, sum(s[name] for s in states) / 3, rtol=0, atol=1e-6, msg=name)
    assert set(expected) <= set(merged)
    per_tensor = hfmerge.merge([str(t) for t in tasks], method="ties", base=str(base), lambda_=0.7,
                               parameters={"density": 0.3}, progress=False)
    other = load_plain(per_tensor.save(tmp_path / "tensor")).state_dict()
    differing = [n for n in expected if not torch.allclose(other[n], merged[n], rtol=0, atol=1e-6)]
    assert len(differing) > len(expected) // 4, differing  # the whole-model trim keeps other entries


def test_thresholds_are_exact_for_ties_zeros_and_the_ends_of_density():
    """The streamed two-pass count gives the m-th smallest magnitude exactly, as one kthvalue over the whole."""
    generator = torch.Generator().manual_seed(0)
    base = {"a": torch.randn(7, 5, generator=generator), "b": torch.randn(33, generator=generator),
            "c": torch.zeros(4, 3, 2)}
    sources = [{k: v + torch.randn(v.shape, generator=generator) * 10.0 ** -i for k, v in base.items()}
               for i in range(3)]
    sources[0]["b"][:10] = base["b"][:10] + 0.25  # tied magnitudes
    sources[1]["a"][:3] = base["a"][:3]  # zeros in the task vector
    tables = {0: base, 1: sources[0], 2: sources[1], 3: sources[2]}
    ops = [DisjointMerge((0, k), ((1, k), (2, k), (3, k)), 1.0, "trim") for k in base]

    def load(ref):
        return tables[ref[0]][ref[1]]

    for density in (0.0, 0.05, 0.3, 0.77, 1.0):
        found = global_trim_thresholds(ops, load, density)
        for i in range(3):
            tau = torch.cat([(tables[i + 1][k] - base[k]).abs().flatten() for k in base])
            m = tau.numel() - int(tau.numel() * density)
            if m == 0:
                assert found.thresholds[i] is None and found.kept[i] == tau.numel()
                continue
            kth = torch.kthvalue(tau, m).values
            assert found.thresholds[i] == float(kth), (density, i)
            assert found.kept[i] == int((tau >= kth).sum()), (density, i)


def test_global_trim_by_repo_id_through_the_command_line_matches_the_local_merge(publish, make_source, tmp_path,
                                                                                  capsys):
    publish("org/ties-base", family="vit", seed=0)
    for s in (1, 2):
        publish(f"org/ties-task{s}", family="vit", seed=s)
    out = tmp_path / "hub"
    code, _, err = run_cli(["merge", "org/ties-task1", "org/ties-task2", "-m", "ties", "--base", "org/ties-base",
                            "--param", "trim=global", "--param", "density=0.25", "-o", out, "-q"], capsys)
    assert code == 0, err
    local = hfmerge.merge([str(make_source("vit", seed=s)) for s in (1, 2)], method="ties",
                          base=str(make_source("vit", seed=0)), parameters={"density": 0.25, "trim": "global"},
                          progress=False).save(tmp_path / "local")
    assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    card = (out / "README.md").read_text()
    assert "Over the whole model" in card and "`topk_values_mask`" in card
    code, text, _ = run_cli(["merge", "org/ties-task1", "org/ties-task2", "-m", "ties", "--base", "org/ties-base",
                             "--param", "trim=global", "--dry-run"], capsys)
    assert code == 0 and "trim: over each whole task vector" in text
