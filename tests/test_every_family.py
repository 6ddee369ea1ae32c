"""The merges of issue 19 on every family hfmerge knows: identical sources merge to themselves, or a one-line refusal.

tests/test_every_method.py holds every method to its properties on ViT and ResNet; here the newer data-free
merges (the SVD merges, WUDI, Model Stock, SLERP, EMR) and AdaMerging meet the other families too: MobileNetV2,
SegFormer, UperNet, Mask2Former and hfmerge's MLP and VGG. With the base equal to the sources every task vector
is zero, so each merge must give the source back bit for bit, whatever its maths does with matrices, kernels,
norms or heads (EMR: each task's model).
"""

from __future__ import annotations

import pytest
import torch

import hfmerge
from hfmerge.testing.tiny import CLASSIC_FAMILIES, FAMILIES, is_image_classifier

OTHER_FAMILIES = sorted(set(FAMILIES) - {"vit", "resnet"}) + list(CLASSIC_FAMILIES)
# A CLIPModel's text tower is never merged; EMR's repository, which rebuilds every task from task vectors, has no
# place to carry it (the vision towers, CLIPVisionModel, merge with EMR).
REFUSED = {("emr", "clip-model"): "EMR's per-task repository cannot carry"}
STATIC = ("tsv_m", "iso_c", "iso_cts", "wudi", "model_stock", "slerp", "emr")


def merged_tensors(result, folder, method: str) -> dict[str, torch.Tensor]:
    saved = result.save(folder)
    model = hfmerge.load(str(saved), task=0) if method == "emr" else hfmerge.load(str(saved))
    return model.state_dict()


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_identical_sources_merge_to_themselves_on_every_family(family, make_source, tmp_path):
    source = make_source(family, 3, seed=4)
    expected = hfmerge.load(str(source)).state_dict()
    for method in STATIC:
        base = {} if method == "slerp" else {"base": str(source)}
        steps = {"steps": 3} if method == "wudi" else {}
        if (method, family) in REFUSED:
            with pytest.raises(hfmerge.IncompatibleModelsError, match=REFUSED[method, family]) as refused:
                hfmerge.merge([str(source), str(source)], method=method, progress=False, **base, **steps)
            assert "\n" not in str(refused.value)
            continue
        result = hfmerge.merge([str(source), str(source)], method=method, progress=False, **base, **steps)
        merged = merged_tensors(result, tmp_path / method, method)
        assert set(merged) == set(expected), method
        for name, value in merged.items():
            assert torch.equal(value, expected[name]), (method, name)


@pytest.mark.parametrize("family", OTHER_FAMILIES)
def test_adamerging_merges_classifiers_and_refuses_the_rest_in_one_line(family, make_source, tmp_path):
    from test_every_method import random_images

    source = str(make_source(family, 3, seed=4))
    data = [str(random_images(tmp_path / "a", count=4)), str(random_images(tmp_path / "b", count=4))]
    arguments = {"base": source, "data": data, "steps": 1, "batch_size": 2}
    if not is_image_classifier(family):
        with pytest.raises(hfmerge.IncompatibleModelsError, match=r"adamerging minimises the entropy of class predictions, and .* is (an image-segmentation|an image-feature-extraction|a zero-shot-image-classification) model") as refused:
            hfmerge.merge([source, source], method="adamerging", progress=False, **arguments)
        assert "\n" not in str(refused.value)
        return
    result = hfmerge.merge([source, source], method="adamerging", progress=False, **arguments)
    merged, expected = merged_tensors(result, tmp_path / "out", "adamerging"), hfmerge.load(source).state_dict()
    assert set(merged) == set(expected)
    for name, value in merged.items():
        assert torch.equal(value, expected[name]), name
