"""What the tests of the SVD-based merges (tsv_m, iso_c, iso_cts) share: a whole-model expectation from a layer formula.

The test gives the paper's formula for one weight matrix (written in the test,
in float64); this module applies it to every weight matrix of models loaded
with plain transformers and the papers' rule to every other tensor, then
compares every tensor of the merged output. Which tensors are weight matrices
is read here from the modules (``nn.Linear`` and ``nn.Conv2d`` weights), not
from hfmerge.
"""

from __future__ import annotations

import json

import torch
import transformers

import hfmerge


def load_plain(folder):
    config = json.loads((folder / "config.json").read_text())
    return getattr(transformers, config["architectures"][0]).from_pretrained(folder).eval()


def weight_matrices(model) -> set[str]:
    """The weights of the model's linear layers and convolutions."""
    return {f"{name}.weight" for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d))}


def as_matrix64(tensor):
    return tensor.double().reshape(tensor.shape[0], -1)


def merge_and_compare(family, method, make_source, tmp_path, layer_formula, *, lam, seeds=(1, 2, 3), atol=1e-6,
                      **parameters):
    """Merge tiny ``family`` models from ``seeds`` on a base from seed 0 and check every tensor against the hand formula.

    ``layer_formula(base, deltas)`` is the merged task matrix of one weight (float64 matrices in, one out).
    Other float tensors must be θ_base + λ·mean(τᵢ), BatchNorm statistics the sources' mean, integer buffers the
    first source's. Returns the merged state dict, the base's, the sources' and the names of the weight matrices.
    """
    base = make_source(family, seed=0)
    tasks = [make_source(family, seed=s) for s in seeds]
    result = hfmerge.merge([str(t) for t in tasks], method=method, base=str(base), lambda_=lam,
                           parameters=parameters, progress=False)
    merged = load_plain(result.save(tmp_path / f"{method}-{family}")).state_dict()
    base_model = load_plain(base)
    sb, states = base_model.state_dict(), [load_plain(t).state_dict() for t in tasks]
    matrices = weight_matrices(base_model)
    assert set(merged) == set(sb)
    checked = 0
    for name, value in merged.items():
        if not value.dtype.is_floating_point:
            assert torch.equal(value, states[0][name]), name
            continue
        if name.endswith(("running_mean", "running_var")):
            expected = sum(s[name].double() for s in states) / len(states)
        elif name in matrices:
            b = as_matrix64(sb[name])
            expected = (b + lam * layer_formula(b, [as_matrix64(s[name]) - b for s in states])).reshape(value.shape)
            checked += 1
        else:
            expected = sb[name].double() + lam * sum(s[name].double() - sb[name].double() for s in states) / len(states)
        torch.testing.assert_close(value, expected.float(), rtol=0, atol=atol, msg=name)
    assert checked >= 5  # every family here has several linear layers or convolutions
    return merged, sb, states, matrices
