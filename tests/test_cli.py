"""The command line as a user meets it: successful runs, and every bad input giving one line and exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import assert_one_line_error, run_cli

import hfmerge
from hfmerge.testing.tiny import tiny_model


@pytest.fixture
def vits(make_source):
    return make_source("vit", seed=1), make_source("vit", seed=2)


def nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], list(tmp_path.iterdir())


def test_merge_writes_a_loadable_folder_and_prints_where(vits, tmp_path, capsys):
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(["merge", *vits, "--method", "average", "--weights", "1,1", "--output", out, "-q"],
                              capsys)
    assert code == 0
    assert stdout.strip() == f"saved: {out}"
    assert sorted(p.name for p in out.iterdir()) == [  # and the list of them, for a later --overwrite
        ".hfmerge-files.json", "README.md", "config.json", "hfmerge.yaml", "model.safetensors",
        "preprocessor_config.json"]
    nothing_written_but_output = [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert nothing_written_but_output == []


def test_dry_run_prints_the_plan_and_writes_nothing(make_source, tmp_path, capsys):
    a, b = make_source("segformer", 3, seed=1), make_source("segformer", 5, seed=2)
    out = tmp_path / "merged"
    code, stdout, _ = run_cli(["merge", a, b, "--method", "layerwise", "--anchor", a, "--output", out, "--dry-run"],
                              capsys)
    assert code == 0
    assert "method: layerwise" in stdout
    assert "[anchor]" in stdout.splitlines()[1]
    assert "layer-weighted:" in stdout and "kept from anchor: 2 tensors" in stdout
    nothing_written(tmp_path, out)


def test_run_recipe_reproduces_the_merge_from_its_hfmerge_yaml(vits, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "sources": [
        {"model": str(vits[0]), "weight": 1}, {"model": str(vits[1]), "weight": 3}]}))
    first, second = tmp_path / "first", tmp_path / "second"
    assert run_cli(["run", recipe, "--output", first, "-q"], capsys)[0] == 0
    assert run_cli(["run", first / "hfmerge.yaml", "--output", second, "-q"], capsys)[0] == 0
    assert (first / "model.safetensors").read_bytes() == (second / "model.safetensors").read_bytes()


def test_trainer_checkpoint_folders_are_sources(tmp_path, capsys):
    folders = []
    for step, seed in ((100, 1), (200, 2)):
        folder = tmp_path / "run" / f"checkpoint-{step}"
        tiny_model("resnet", seed=seed).save_pretrained(folder)
        torch.save({"state": {}}, folder / "optimizer.pt")
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        folders.append(folder)
    out = tmp_path / "merged"
    assert run_cli(["merge", *folders, "-m", "layerwise", "-o", out, "-q"], capsys)[0] == 0
    assert (out / "model.safetensors").exists()


def test_python_dash_m_and_console_script(vits, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "hfmerge", "merge", str(vits[0]), str(vits[1]), "-m", "average",
                           "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "method: average" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "hfmerge", "merge", str(vits[0]), "-m", "nope"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "available methods" in bad.stderr


@pytest.mark.parametrize("command", ["methods", "inspect", "merge --dry-run"])
def test_a_reader_that_went_away_ends_every_command_quietly(vits, command):
    args = {"methods": ["methods"], "inspect": ["inspect", str(vits[0])],
            "merge --dry-run": ["merge", str(vits[0]), str(vits[1]), "-m", "average", "--dry-run"]}[command]
    # stdout buffered as in a user's shell: the output fails at a print or at the last flush, by its length
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"} | {"HF_HUB_OFFLINE": "1"}
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the first line, as in `hfmerge methods | head -0`
    try:
        done = subprocess.run([sys.executable, "-m", "hfmerge", *args], stdout=writer, stderr=subprocess.PIPE,
                              text=True, env=env, timeout=120)
    finally:
        os.close(writer)
    assert done.stderr == ""
    assert done.returncode == 141  # 128 + SIGPIPE: what a shell reports for `git log | head -1`


# -- bad input: one clear line, exit code 2, nothing written ---------------------------------------------


@pytest.mark.parametrize(
    ("extra", "fragments"),
    [
        (["--method", "frobnicate"], ["unknown method 'frobnicate'", ", ".join(hfmerge.available_methods())]),
        (["--method", "layerwise", "--param", "depth=3"], ["unknown parameter(s) ['depth']", "start_layer"]),
        (["--method", "layerwise", "--param", "start_layer=x"], ["must be int"]),
        (["--method", "task_arithmetic"], ["needs the pre-trained model", "--base"]),
        (["--method", "average", "--weights", "1,2,3"], ["3 weights for 2 sources"]),
        (["--method", "average", "--weights", "1,-1"], ["non-negative"]),
        (["--method", "average", "--weights", "1,x"], ["'x' is not a number"]),
        (["--method", "layerwise", "--anchor", "org/other"], ["anchor 'org/other' is not one of the sources"]),
        (["--method", "average", "--dtype", "int8"], ["unknown dtype 'int8'", "bfloat16"]),
        (["--method", "average", "--param", "novalue"], ["is not KEY=VALUE"]),
    ],
)
def test_bad_recipe_input(vits, tmp_path, capsys, extra, fragments):
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *vits, *extra, "--output", out], capsys)
    assert_one_line_error(code, err, *fragments)
    nothing_written(tmp_path, out)


def test_missing_method_flag_is_a_usage_line(vits, tmp_path, capsys):
    code, _, err = run_cli(["merge", *vits, "--output", tmp_path / "o"], capsys)
    assert_one_line_error(code, err, "--method")


def test_no_destination(vits, capsys):
    code, _, err = run_cli(["merge", *vits, "-m", "average"], capsys)
    assert_one_line_error(code, err, "--output DIR")


@pytest.mark.parametrize(
    ("sources", "fragments"),
    [
        (["org/does-not-exist", "org/also-missing"], ["is not a folder here and does not exist on the Hub"]),
        (["./no/such/folder", "./other"], ["neither an existing folder nor a Hub repo id"]),
    ],
)
def test_sources_that_do_not_exist(local_hub, tmp_path, capsys, sources, fragments):
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", *sources, "-m", "average", "-o", out], capsys)
    assert_one_line_error(code, err, *fragments)
    nothing_written(tmp_path, out)


def test_revision_that_does_not_exist_and_private_repo_without_token(publish, tmp_path, capsys, monkeypatch):
    publish("org/cli-vit", family="vit", seed=1)
    publish("org/cli-private", family="vit", seed=2, private=True)
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", "org/cli-vit@nope", "org/cli-vit", "-m", "average", "-o", out], capsys)
    assert_one_line_error(code, err, "revision 'nope' does not exist in org/cli-vit")
    monkeypatch.delenv("HF_TOKEN")
    code, _, err = run_cli(["merge", "org/cli-private", "org/cli-vit", "-m", "average", "-o", out], capsys)
    assert_one_line_error(code, err, "private", "HF_TOKEN")
    assert "hf_local_test_token" not in err
    nothing_written(tmp_path, out)


def test_source_without_safetensors(tmp_path, make_source, capsys):
    folder = tmp_path / "pickled"
    model = tiny_model("vit")
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", folder, make_source("vit"), "-m", "average", "-o", out], capsys)
    assert_one_line_error(code, err, "only pickle weights", "--allow-pickle")
    assert not out.exists()


def test_sources_of_different_families(make_source, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", make_source("vit"), make_source("resnet"), "-m", "average", "-o", out], capsys)
    assert_one_line_error(code, err, "different families", "resnet", "vit")
    nothing_written(tmp_path, out)


@pytest.mark.parametrize(
    ("other_config", "method", "fragment"),
    [
        ({"embedding_size": 4, "hidden_sizes": [4, 12], "depths": [1, 1], "num_labels": 5}, "layerwise",
         "shares no parameter"),
        ({"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [2, 1], "num_labels": 3}, "fusion",
         "backbones differ"),
    ],
)
def test_resnets_that_cannot_be_merged(make_source, tmp_path, capsys, other_config, method, fragment):
    from transformers import ResNetConfig, ResNetForImageClassification

    other = ResNetForImageClassification(ResNetConfig(layer_type="basic", **other_config))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", make_source("resnet"), make_source("resnet", model=other), "-m", method,
                            "-o", out], capsys)
    assert_one_line_error(code, err, fragment)
    nothing_written(tmp_path, out)


def test_checkpoint_whose_shapes_disagree_with_its_config(make_source, tmp_path, capsys):
    bad = make_source("vit", seed=2)
    config = json.loads((bad / "config.json").read_text())
    config["intermediate_size"] = 48
    (bad / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", make_source("vit"), bad, "-m", "average", "-o", out], capsys)
    assert_one_line_error(code, err, "config implies", "disagree")
    nothing_written(tmp_path, out)


def test_nan_produced_by_a_merge_writes_nothing(make_source, tmp_path, capsys):
    model = tiny_model("vit", seed=2)
    with torch.no_grad():
        model.vit.layernorm.weight[0] = float("nan")
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", make_source("vit"), make_source("vit", model=model), "-m", "average",
                            "-o", out], capsys)
    assert_one_line_error(code, err, "NaN or inf", "vit.layernorm.weight")
    nothing_written(tmp_path, out)


def test_float16_overflow_is_reported(make_source, tmp_path, capsys):
    model = tiny_model("vit", seed=2)
    with torch.no_grad():
        model.classifier.bias[0] = 1e6
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", make_source("vit", model=model), make_source("vit", model=model), "-m",
                            "average", "--dtype", "float16", "-o", out], capsys)
    assert_one_line_error(code, err, "overflows float16")
    nothing_written(tmp_path, out)


def test_recipe_with_unknown_field(vits, tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"method": "average", "sources": [str(v) for v in vits], "mode": "fast"}))
    code, _, err = run_cli(["run", recipe, "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "unknown recipe field(s) ['mode']", "valid fields")
    assert not (tmp_path / "out").exists()


def test_recipe_file_missing_or_not_yaml(tmp_path, capsys):
    code, _, err = run_cli(["run", tmp_path / "none.yaml", "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "does not exist")
    broken = tmp_path / "broken.yaml"
    broken.write_text("method: [average\n")
    code, _, err = run_cli(["run", broken, "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "not valid YAML")
