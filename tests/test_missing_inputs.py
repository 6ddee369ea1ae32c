"""What a new user leaves out or mistypes, refused in one line before anything is merged or written.

A model folder without its image processor (a copy that kept only config and weights), a data folder that is
not there, a mistyped relative source that reads as a Hub repo id while the Hub cannot be reached: each used to
run the whole merge and then fail (a traceback naming hfmerge's hidden staging folder), or to fail naming the
wrong thing.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
from helpers import assert_one_line_error, run_cli

import hfmerge
from hfmerge.data.processor import has_image_processor
from hfmerge.errors import DataError, HubUnreachableError, SourceError
from hfmerge.methods.gating.training import TrainGate
from hfmerge.methods.stages import DataNeed, FineTune, Statistics
from hfmerge.run.materialise import PROCESSOR_FILES
from hfmerge.testing.tiny import CLASSIC_FAMILIES, FAMILIES, save_tiny

ZERO_SHOT = {"clip", "clip-projection"}  # towers scored with a CLIPModel's text tower: --eval-data needs --base


def without_processor(folder: Path) -> Path:
    """``folder`` with its image processor's files deleted, as a copy of only config and weights leaves it."""
    for name in PROCESSOR_FILES:
        (folder / name).unlink(missing_ok=True)
    assert not has_image_processor(folder)
    return folder


def image_folder(folder: Path, classes: tuple[str, ...] = ("a", "b"), per_class: int = 2) -> Path:
    """A labeled image folder (one subfolder per class) of small random images."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for label in classes:
        (folder / label).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / label / f"{i}.png")
    return folder


def written(tmp_path: Path, *kept: Path) -> list[str]:
    """What is in ``tmp_path`` besides what the test made: an output, a staging folder left behind."""
    return sorted(p.name for p in tmp_path.iterdir() if p not in kept)


# -- a model without an image processor ------------------------------------------------------------------------


def test_has_image_processor_reads_what_auto_image_processor_reads(tmp_path):
    import json

    assert not has_image_processor(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "X"}))
    assert not has_image_processor(tmp_path)  # a processor of text only: AutoImageProcessor finds nothing
    (tmp_path / "processor_config.json").write_text(json.dumps({"image_processor": {"size": 16}}))
    assert has_image_processor(tmp_path)  # transformers 5's nested form (a CLIPProcessor's)
    (tmp_path / "processor_config.json").unlink()
    (tmp_path / "preprocessor_config.json").write_text("{}")
    assert has_image_processor(tmp_path)


@pytest.mark.parametrize("family", [*FAMILIES, *CLASSIC_FAMILIES])
def test_eval_data_on_sources_without_processor_is_refused_before_the_merge(family, tmp_path, capsys):
    sources = [without_processor(save_tiny(tmp_path / f"{family}-{i}", family, seed=i)) for i in range(2)]
    data = image_folder(tmp_path / "data")
    base = ["--base", save_tiny(tmp_path / "base", "clip-model")] if family in ZERO_SHOT else []
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *sources, "--method", "average", "--eval-data", data, *base, "--output", out],
                           capsys)
    assert_one_line_error(code, err, f"{sources[0]} has no image processor (preprocessor_config.json)",
                          "the evaluation (--eval-data)", "AutoImageProcessor.save_pretrained",
                          "merge sources that have one")
    assert "staging" not in err  # the message names the source, not hfmerge's hidden folder
    assert "merged" not in err  # refused before the merge ran ("hfmerge: merged N tensors")
    assert written(tmp_path, *sources, data, *(Path(b) for b in base[1:])) == []


def test_the_source_without_processor_is_the_one_named(make_source, tmp_path, capsys):
    anchor, other = make_source("vit"), without_processor(make_source("vit", seed=1))
    data = image_folder(tmp_path / "data")
    code, _, err = run_cli(["merge", anchor, other, "-m", "average", "--eval-data", data, "--dry-run"], capsys)
    assert_one_line_error(code, err, f"{other} has no image processor")
    assert str(anchor) + " has" not in err


def test_data_stages_refuse_a_source_without_processor_before_reading_data(make_source, tmp_path, capsys):
    sources = [make_source("vit"), without_processor(make_source("vit", seed=1))]
    data = tmp_path / "empty"  # no images: read first, it would be refused for that instead
    data.mkdir()
    code, _, err = run_cli(["merge", *sources, "-m", "regmean", "--data", data, "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, f"{sources[1]} has no image processor", "the statistics stage", "--data")
    assert not (tmp_path / "out").exists()


def test_python_api_and_dry_run_refuse_it_too(make_source, tmp_path):
    sources = [str(without_processor(make_source("resnet", seed=i))) for i in range(2)]
    data = str(image_folder(tmp_path / "data"))
    with pytest.raises(SourceError, match="has no image processor"):
        hfmerge.merge(sources, method="average", eval_data=[data], output=str(tmp_path / "out"), progress=False)
    with pytest.raises(SourceError, match="has no image processor"):
        hfmerge.plan_merge(hfmerge.Recipe(sources=sources, method="average", eval_data=[data]), metadata_only=True)
    assert not (tmp_path / "out").exists()


def test_the_base_whose_processor_a_clip_format_output_keeps_is_named(tmp_path, capsys):
    base = without_processor(save_tiny(tmp_path / "base", "clip-model"))
    towers = [save_tiny(tmp_path / f"tower-{i}", "clip", seed=i) for i in range(2)]  # with their processors
    data = image_folder(tmp_path / "data")
    code, _, err = run_cli(["merge", *towers, "-m", "task_arithmetic", "--base", base, "--output-format", "clip",
                            "--eval-data", data, "--dry-run"], capsys)
    assert_one_line_error(code, err, f"{base} has no image processor", "the merged model keeps its processor",
                          "give a --base that has one")


def test_stages_name_the_processors_they_read():
    """Statistics and fine-tuning read each source through its own processor; the gate training reads every
    source's images through the anchor's; a stage that reads no data reads none."""
    anchor, other = SimpleNamespace(name="a"), SimpleNamespace(name="b")
    ctx = SimpleNamespace(sources=[anchor, other], anchor=anchor)
    assert Statistics(request=lambda c, i: None).image_processors(ctx) == [anchor, other]
    assert FineTune(tuning=lambda c: None).image_processors(ctx) == [anchor, other]
    gate = TrainGate(gate="gate", fraction=0.5, epochs=1, learning_rate=1e-3, batch_size=4)
    assert gate.image_processors(ctx) == [anchor]

    class NoData(Statistics):
        def data_need(self) -> DataNeed | None:
            return None

    assert NoData(request=lambda c, i: None).image_processors(ctx) == []


def test_a_plain_merge_without_processor_warns_once_and_writes(make_source, tmp_path, capsys):
    sources = [without_processor(make_source("vit", seed=i)) for i in range(2)]
    code, out, err = run_cli(["merge", *sources, "-m", "average", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    warned = [line for line in err.splitlines() if "has no image processor" in line]
    assert warned == [f"hfmerge: warning: {sources[0]} has no image processor (preprocessor_config.json), so the "
                      "merged model will have none and pipeline(...) cannot load it: save one into the output "
                      "folder with AutoImageProcessor.save_pretrained(folder), or merge sources that have one"]
    assert (tmp_path / "out" / "model.safetensors").is_file()
    assert not has_image_processor(tmp_path / "out")


def test_a_plain_merge_whose_anchor_has_a_processor_does_not_warn(make_source, tmp_path, capsys):
    anchor, other = make_source("vit"), without_processor(make_source("vit", seed=1))
    code, _, err = run_cli(["merge", anchor, other, "-m", "average", "-o", tmp_path / "out"], capsys)
    assert code == 0, err
    assert "image processor" not in err
    assert has_image_processor(tmp_path / "out")  # the anchor's, as the README promises


@pytest.mark.parametrize("family", [*FAMILIES, *CLASSIC_FAMILIES])
def test_evaluate_refuses_a_model_without_processor_before_reading_data(family, make_source, tmp_path, capsys):
    model = without_processor(make_source(family))
    data = tmp_path / "empty"  # no images: read first, it would be refused for that instead
    data.mkdir()
    code, _, err = run_cli(["evaluate", model, "--data", data], capsys)
    assert_one_line_error(code, err, f"{model} has no image processor", "hfmerge evaluate",
                          "AutoImageProcessor.save_pretrained")


def test_evaluate_refuses_a_compared_model_without_processor(make_source, tmp_path, capsys):
    model, compared = make_source("vit"), without_processor(make_source("vit", seed=1))
    data = image_folder(tmp_path / "data")
    code, _, err = run_cli(["evaluate", model, "--data", data, "--compare", compared, "--json",
                            tmp_path / "r.json"], capsys)
    assert_one_line_error(code, err, f"{compared} has no image processor", "--compare", "drop it from --compare")
    assert not (tmp_path / "r.json").exists()


# -- a data folder that does not exist -------------------------------------------------------------------------


@pytest.mark.parametrize("given", ["./no-such-data", "{tmp}/no-such-data", "~/hfmerge-no-such-data-42",
                                   "{tmp}/no-such-data:test"])
def test_a_missing_data_folder_is_refused_before_the_merge_and_in_a_dry_run(given, make_source, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    sources = [make_source("vit", seed=i) for i in range(2)]
    data = given.format(tmp=tmp_path)
    shown = data.removesuffix(":test")
    for args in (["-m", "regmean", "--data", data], ["-m", "average", "--eval-data", data]):
        option = args[2]
        code, _, err = run_cli(["merge", *sources, *args, "--dry-run"], capsys)
        assert_one_line_error(code, err, f"{option} {shown!r}: there is no such folder", "give an existing folder")
        code, _, err = run_cli(["merge", *sources, *args, "-o", tmp_path / "out"], capsys)
        assert_one_line_error(code, err, f"{option} {shown!r}: there is no such folder")
        assert "merged" not in err and not (tmp_path / "out").exists()


def test_a_hub_dataset_id_is_not_taken_for_a_missing_folder(make_source, capsys):
    sources = [make_source("vit", seed=i) for i in range(2)]
    code, out, err = run_cli(["merge", *sources, "-m", "regmean", "--data", "org/not-a-folder-here", "--dry-run"],
                             capsys)
    assert code == 0, err
    assert "org/not-a-folder-here" in out


def test_evaluate_names_a_missing_data_folder(make_source, tmp_path, capsys):
    code, _, err = run_cli(["evaluate", make_source("vit"), "--data", tmp_path / "nope"], capsys)
    assert_one_line_error(code, err, f"--data {str(tmp_path / 'nope')!r}: there is no such folder")


def test_the_reader_says_the_same_for_a_missing_folder(tmp_path):
    from hfmerge.data import load_image_data

    with pytest.raises(DataError, match="there is no such folder"):
        load_image_data(str(tmp_path / "nope"))


# -- a mistyped relative source, read as a Hub repo id, while the Hub cannot be reached ---------------------------


def test_a_mistyped_folder_is_said_to_be_no_folder_here(unreachable_hub, make_source, tmp_path, capsys,
                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = make_source("vit")
    code, _, err = run_cli(["merge", real, "sources/vit-mirorred", "-m", "average", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, f"cannot reach the Hub at {unreachable_hub}",
                          "there is no folder 'sources/vit-mirorred' here", "check the path", "HF_HUB_OFFLINE=1")
    assert not (tmp_path / "out").exists()


def test_a_repo_named_with_a_revision_is_not_said_to_be_a_folder(unreachable_hub, capsys):
    code, _, err = run_cli(["inspect", "org/far@main"], capsys)
    assert_one_line_error(code, err, f"cannot reach the Hub at {unreachable_hub}", "HF_HUB_OFFLINE=1")
    assert "no folder" not in err


def test_a_mistyped_data_folder_is_said_to_be_no_folder_here(unreachable_hub):
    from hfmerge.data import load_image_data

    with pytest.raises(HubUnreachableError, match="there is no folder 'data/mirored-test' here"):
        load_image_data("data/mirored-test", samples=4)
