"""Data methods end to end: models and datasets by Hub id, through the CLI and the Python API."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import assert_one_line_error, run_cli
from safetensors.torch import load_file

import hfmerge
from hfmerge.testing.digit_models import accuracy


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def _load(folder):
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(folder)


def _linear_inputs(model, data, processor, modules):
    """The inputs of ``modules`` (nn.Linear, by in-memory name) when ``model`` runs on ``data``, as float64 rows."""
    from hfmerge.data.load import ProcessedImages

    found = dict(model.named_modules())
    rows = {name: [] for name in modules}
    handles = [found[name].register_forward_pre_hook(
        lambda module, args, name=name: rows[name].append(args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for name in modules]
    items = ProcessedImages(data, processor)
    with torch.no_grad():
        for start in range(0, len(items), 64):
            batch = torch.stack([items[i]["pixel_values"] for i in range(start, min(start + 64, len(items)))])
            model.eval()(pixel_values=batch)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(chunks) for name, chunks in rows.items()}


def test_regmean_by_repo_and_dataset_id(digit_hub, hub_api, tmp_path, capsys):
    """RegMean by repo and dataset id: pinned data, a data section, the statistics cache, and its guarantee.

    RegMean does not beat ``average`` end to end on these two digit domains, and the test shows why: it
    minimises, layer by layer, Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖² over each source's own inputs X_i (with the Gram
    matrices' off-diagonal entries scaled by α), and that objective is lower than the average's on every
    linear layer — but two models fine-tuned for a few epochs from one base on the same ten labels are so close
    that the average is already near that optimum (both stay within about two points of each other, on
    either side depending on the machine's arithmetic; the ViT paper's gains come from 6 to 12 distant tasks).
    """
    from transformers import AutoImageProcessor

    from hfmerge.adapters import inspect_source
    from hfmerge.data.load import load_image_data
    from hfmerge.hub.resolve import resolve_source

    m, d = digit_hub["models"], digit_hub["datasets"]
    out = tmp_path / "regmean"
    code, _, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "regmean",
                            "--data", f"{d['digits']}:train", "--data", f"{d['digits-mirrored']}:train",
                            "--param", "samples=200", "--output", out], capsys)
    assert code == 0, err
    assert "statistics stage" in err and "computed" in err  # one line per stage, with its time
    pinned = yaml.safe_load((out / "hfmerge.yaml").read_text())
    assert [entry["commit"] for entry in pinned["data"]] == [
        hub_api.dataset_info(d["digits"]).sha, hub_api.dataset_info(d["digits-mirrored"]).sha]
    card = (out / "README.md").read_text()
    assert "## Data" in card and "org/digits:train" in card and "RegMean" in card
    sha = pinned["data"][0]["commit"]
    assert f"--data {d['digits']}@{sha}:train" in card  # the one-line command reads the same data

    average = hfmerge.merge([m["upright"], m["mirrored"]], method="average", progress=False)
    regmean_model, average_model = _load(out), _load(average.staging)
    sources = [_load(digit_hub["folders"][name]) for name in ("upright", "mirrored")]
    linears = [module for group in inspect_source(resolve_source(str(out))).linear_groups for module in group
               if not module.startswith("classifier")]
    assert len(linears) == 4 * 2 + 2 * 2  # q, k, v, o and the two MLP layers of each of the 2 blocks
    inputs = []
    for source, task, name in zip(sources, (d["digits"], d["digits-mirrored"]), ("upright", "mirrored")):
        data = load_image_data(f"{task}:train", samples=200, seed=0)  # the selection the merge read
        processor = AutoImageProcessor.from_pretrained(digit_hub["folders"][name])
        inputs.append(_linear_inputs(source, data, processor, linears))

    def objective(model, module):
        weight = dict(model.named_modules())[module].weight.detach().double()
        total = 0.0
        for source, x in zip(sources, inputs):
            gram = x[module].T @ x[module]
            gram = 0.9 * gram + 0.1 * torch.diag(torch.diag(gram))
            delta = weight - dict(source.named_modules())[module].weight.detach().double()
            total += float(torch.trace(delta @ gram @ delta.T))
        return total

    for module in linears:
        assert objective(regmean_model, module) <= objective(average_model, module) * (1 + 1e-6), module
    assert sum(objective(regmean_model, l) for l in linears) < 0.9 * sum(objective(average_model, l) for l in linears)
    for task in ("digits", "digits-mirrored"):
        assert accuracy(regmean_model, task) >= accuracy(average_model, task) - 0.03, task

    # a second merge with another α reads the same statistics from the cache, and says so
    code, _, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "regmean",
                            "--data", f"{d['digits']}:train", "--data", f"{d['digits-mirrored']}:train",
                            "--param", "samples=200", "--param", "alpha=0.5", "--output", tmp_path / "again"], capsys)
    assert code == 0, err
    assert err.count("read from the cache") == 2 and "computed" not in err


@pytest.mark.parametrize("method", ["regmean", "fisher"])
def test_identical_sources_merge_to_themselves(method, digit_hub):
    folder = digit_hub["folders"]["upright"]
    result = hfmerge.merge([str(folder), str(folder)], method=method, data=[f"{digit_hub['datasets']['digits']}:test"],
                           samples=16, progress=False)
    merged, source = _tensors(result.staging), _tensors(folder)
    assert merged.keys() == source.keys()
    for key, tensor in source.items():
        assert torch.allclose(merged[key].float(), tensor.float(), atol=1e-5), key


def test_fisher_of_one_source_is_that_source(digit_hub):
    folder = digit_hub["folders"]["mirrored"]
    result = hfmerge.merge([str(folder)], method="fisher", data=[f"{digit_hub['datasets']['digits-mirrored']}:test"],
                           samples=8, progress=False)
    merged, source = _tensors(result.staging), _tensors(folder)
    assert all(torch.equal(merged[k], v) for k, v in source.items())


def test_fusion_fine_tuned_on_the_sources_data_beats_fusion_without(digit_hub, tmp_path, capsys):
    m, d = digit_hub["models"], digit_hub["datasets"]
    plain = hfmerge.merge([m["low"], m["high"]], method="fusion", progress=False)
    out = tmp_path / "fused"
    code, _, err = run_cli(["merge", m["low"], m["high"], "--method", "fusion",
                            "--data", f"{d['digits-low']}:train", "--data", f"{d['digits-high']}:train",
                            "--param", "finetune_epochs=3", "--param", "learning_rate=1e-3",
                            "--output", out, "-q"], capsys)
    assert code == 0, err
    tuned_score, plain_score = accuracy(_load(out), "digits"), accuracy(_load(plain.staging), "digits")
    assert tuned_score > plain_score + 0.02, (tuned_score, plain_score)
    method = (out / "README.md").read_text().split("## Method", 1)[1].split("\n## ", 1)[0]
    assert "was then fine-tuned" in method and "org/digits-low:train" in method
    plain_method = plain.card.text.split("## Method", 1)[1].split("\n## ", 1)[0]
    assert "That step was not applied" in plain_method


def test_evaluate_updates_the_card_with_a_table_and_model_index(digit_hub, tmp_path, capsys):
    from huggingface_hub import ModelCard

    m, d = digit_hub["models"], digit_hub["datasets"]
    out = tmp_path / "average"
    hfmerge.merge([m["upright"], m["mirrored"]], method="average", output=out, progress=False)
    results = tmp_path / "results.json"
    code, stdout, err = run_cli(["evaluate", out, "--data", f"{d['digits']}:test", "--data",
                                 f"{d['digits-mirrored']}:test", "--ensemble", "--json", results,
                                 "--update-card", "-q"], capsys)
    assert code == 0, err
    report = json.loads(results.read_text())
    card = ModelCard.load(out / "README.md")
    parsed = {(r.dataset_name, r.metric_type): r.metric_value for r in card.data.eval_results}
    merged = next(row for row in report["models"] if row["role"] == "merged")
    for task in merged["tasks"]:
        assert parsed[(task["dataset"], "accuracy")] == pytest.approx(task["metrics"]["accuracy"])
    # the reported accuracy is the model's, computed here independently
    upright = next(t for t in merged["tasks"] if t["dataset"].startswith(d["digits"] + ":") or t["dataset"] == d["digits"])
    assert upright["metrics"]["accuracy"] == pytest.approx(accuracy(_load(out), "digits"), abs=1e-6)
    assert "## Evaluation" in card.text and (out / "evaluation.svg").is_file()
    roles = [row["role"] for row in report["models"]]
    assert roles.count("source") == 2 and "ensemble" in roles
    # running it again replaces the section instead of adding a second one
    code, _, err = run_cli(["evaluate", out, "--data", f"{d['digits']}:test", "--update-card", "-q"], capsys)
    assert code == 0, err
    assert ModelCard.load(out / "README.md").text.count("## Evaluation") == 1


def test_merge_with_eval_data_puts_the_results_in_the_card(digit_hub, tmp_path, capsys):
    from huggingface_hub import ModelCard

    m, d = digit_hub["models"], digit_hub["datasets"]
    out = tmp_path / "evaluated"
    code, _, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "average",
                            "--eval-data", f"{d['digits']}:test", "--eval-data", f"{d['digits-mirrored']}:test",
                            "--output", out, "-q"], capsys)
    assert code == 0, err
    card = ModelCard.load(out / "README.md")
    assert len({r.dataset_name for r in card.data.eval_results}) == 2
    assert "## Evaluation" in card.text and "ensemble" in card.text


def test_two_processes_under_accelerate_launch_match_one(digit_hub, tmp_path):
    """The same RegMean merge with 1 process and with 2 (statistics reduced across processes) gives equal tensors."""
    folders = digit_hub["folders"]
    data = f"{digit_hub['datasets']['digits']}:test"
    args = ["merge", str(folders["upright"]), str(folders["mirrored"]), "--method", "regmean", "--data", data,
            "--param", "samples=50", "--param", "batch_size=8", "-q"]
    one = hfmerge.merge([str(folders["upright"]), str(folders["mirrored"])], method="regmean", data=[data],
                        samples=50, batch_size=8, progress=False)
    accelerate = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "HF_HOME": str(tmp_path / "hf_home"), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "two"
    done = subprocess.run(
        [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
         "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
         "-m", "hfmerge", *args, "--output", str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("saved:") == 1  # only the main process writes
    two, single = _tensors(out), _tensors(one.staging)
    assert two.keys() == single.keys()
    for key in single:
        assert torch.allclose(two[key], single[key], atol=1e-5), key


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_data_given_to_a_method_that_reads_none_is_ignored_with_a_note(digit_hub, tmp_path, capsys):
    m, d = digit_hub["models"], digit_hub["datasets"]
    code, _, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "average", "--data", d["digits"],
                            "--output", tmp_path / "out", "-q"], capsys)
    assert code == 0 and "reads no data: --data is ignored" in err
    assert "data" not in yaml.safe_load((tmp_path / "out" / "hfmerge.yaml").read_text())


@pytest.mark.parametrize("case", ["no data", "too many", "no such dataset", "no such split", "no such revision"])
def test_bad_data_is_one_line_and_writes_nothing(case, digit_hub, tmp_path, capsys):
    m, d = digit_hub["models"], digit_hub["datasets"]
    data = {
        "no data": ([], ["regmean", "--data"]),
        "too many": (["--data", d["digits"]] * 3, ["3 --data for 2 sources"]),
        "no such dataset": (["--data", "org/no-such-dataset"], ["org/no-such-dataset"]),
        "no such split": (["--data", f"{d['digits']}:validation"], ["validation", "train", "test"]),
        "no such revision": (["--data", f"{d['digits']}@v9"], ["v9"]),
    }[case]
    out = tmp_path / "out"
    code, _, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "regmean", *data[0],
                            "--output", out, "-q"], capsys)
    assert_one_line_error(code, err, *data[1])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_local_data_folders_stay_local_when_pushed(make_source, tmp_path, hub_api, capsys):
    """A pushed card and hfmerge.yaml name a data folder by its name, never by its path on this machine."""
    from test_every_method import random_images

    source = make_source("vit", 3, seed=1)
    images = random_images(tmp_path / "my-secret-place" / "unlabeled")
    code, _, err = run_cli(["merge", source, source, "--method", "regmean", "--data", images,
                            "--param", "samples=4", "--push-to-hub", "tester/regmean-local-data", "-q"], capsys)
    assert code == 0, err
    pushed = {name: (hub_api.hf_hub_download("tester/regmean-local-data", name)) for name in ("README.md", "hfmerge.yaml")}
    for name, path in pushed.items():
        text = Path(path).read_text()
        assert "my-secret-place" not in text and str(tmp_path) not in text, name
    assert "unlabeled" in Path(pushed["README.md"]).read_text()


@pytest.mark.parametrize("case", ["push without update", "unlabeled", "unknown labels", "json folder missing"])
def test_evaluate_bad_input_is_one_line(case, make_source, tmp_path, capsys):
    from test_every_method import random_images

    model = make_source("vit", 3, seed=2)  # labels class_0, class_1, class_2
    labeled = tmp_path / "labeled"
    for label in ("class_1", "zebra"):
        random_images(labeled / label, count=2)
    args, fragments = {
        "push without update": (["--data", str(labeled), "--push"], ["--update-card"]),
        "unlabeled": (["--data", str(random_images(tmp_path / "flat"))], ["no label column", "--label-column"]),
        "unknown labels": (["--data", str(labeled)], ["'zebra'"]),
        "json folder missing": (["--data", str(labeled), "--json", str(tmp_path / "no" / "r.json")],
                                ["folder does not exist"]),
    }[case]
    before = sorted(p.name for p in model.iterdir())
    code, _, err = run_cli(["evaluate", model, *args, "-q"], capsys)
    assert_one_line_error(code, err, *fragments)
    assert sorted(p.name for p in model.iterdir()) == before


@pytest.mark.parametrize("kind", ["other suffixes", "image suffixes", "mixed"])
def test_a_folder_of_files_that_are_not_images_is_one_line_naming_them_from_merge_and_evaluate(
        kind, make_source, tmp_path, capsys):
    """One subfolder per class, none of whose files is an image: merge and evaluate say so in the same line, naming
    the first files and how many more, and warn of nothing before it."""
    folder = tmp_path / "nonimg"
    # "mixed": files named as images in one class only, which imagefolder reads as one class, so no label column
    names = {"other suffixes": [["notes.txt", "table.csv"]] * 2, "image suffixes": [["photo.png", "scan.jpg"]] * 2,
             "mixed": [["notes.txt", "table.csv"], ["photo.png", "scan.jpg"]]}[kind]
    for label, files in zip(("class_0", "class_1"), names):
        (folder / label).mkdir(parents=True)
        for i in range(4):
            for name in files:
                (folder / label / f"{i}-{name}").write_text("not pixels")
    source = make_source("vit", 3, seed=1)
    code, _, merge_err = run_cli(["merge", source, source, "-m", "regmean", "--data", folder,
                                  "-o", tmp_path / "out", "-q"], capsys)
    assert_one_line_error(code, merge_err, "folder 'nonimg'", "class_0/0-", "and 11 more", "not images")
    code, _, evaluate_err = run_cli(["evaluate", source, "--data", folder, "-q"], capsys)
    assert_one_line_error(code, evaluate_err, "folder 'nonimg'")
    assert evaluate_err == merge_err
    assert "label" not in merge_err
    assert not (tmp_path / "out").exists()


def test_the_pinned_recipe_reproduces_a_data_merge(digit_hub, tmp_path, capsys):
    """``hfmerge run hfmerge.yaml`` reads the same data at the pinned commit and gives the same tensors."""
    m, d = digit_hub["models"], digit_hub["datasets"]
    first = tmp_path / "first"
    code, _, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "fisher", "--data", f"{d['digits']}:test",
                            "--param", "samples=12", "--seed", "3", "--output", first, "-q"], capsys)
    assert code == 0, err
    pinned = yaml.safe_load((first / "hfmerge.yaml").read_text())
    assert pinned["seed"] == 3 and pinned["data"] == [
        {"dataset": d["digits"], "split": "test", "commit": pinned["data"][0]["commit"]}]
    code, _, err = run_cli(["run", first / "hfmerge.yaml", "--output", tmp_path / "again", "-q"], capsys)
    assert code == 0, err
    again, original = _tensors(tmp_path / "again"), _tensors(first)
    assert again.keys() == original.keys() and all(torch.equal(again[k], v) for k, v in original.items())


def test_evaluate_pushes_the_updated_card_to_a_hub_repo(digit_hub, hub_api, capsys):
    from huggingface_hub import ModelCard

    m, d = digit_hub["models"], digit_hub["datasets"]
    hfmerge.merge([m["upright"], m["mirrored"]], method="average", push_to_hub="tester/vit-digits-evaluated",
                  progress=False)
    before = hub_api.model_info("tester/vit-digits-evaluated").sha
    code, out, err = run_cli(["evaluate", "tester/vit-digits-evaluated", "--data", f"{d['digits-mirrored']}:test",
                              "--samples", "60", "--ensemble", "--update-card", "--push", "-q"], capsys)
    assert code == 0, err
    assert m["upright"] in out and m["mirrored"] in out and "ensemble" in out  # the sources from its hfmerge.yaml
    assert "pushed:" in out and hub_api.model_info("tester/vit-digits-evaluated").sha != before
    card = ModelCard.load("tester/vit-digits-evaluated")
    assert [(r.dataset_name, r.metric_type) for r in card.data.eval_results][0] == (d["digits-mirrored"], "accuracy")
    assert "evaluation.svg" in hub_api.list_repo_files("tester/vit-digits-evaluated")


def test_evaluate_with_a_local_metric_module(make_source, tmp_path, capsys):
    """``--metric path.py`` adds that module's numbers beside the built-in ones, computed on the same predictions."""
    from test_every_method import random_images

    model = make_source("vit", 3, seed=2)
    labeled = tmp_path / "labeled"
    for label in ("class_0", "class_1", "class_2"):
        random_images(labeled / label, count=3, size=16)
    metric = tmp_path / "agreement.py"
    metric.write_text("def compute(predictions, references):\n"
                      "    hits = sum(int(p == r) for p, r in zip(predictions, references))\n"
                      "    return {'hits': hits, 'misses': len(references) - hits}\n")
    results = tmp_path / "r.json"
    code, out, err = run_cli(["evaluate", model, "--data", labeled, "--metric", metric, "--json", results, "-q"], capsys)
    assert code == 0, err
    task = json.loads(results.read_text())["models"][0]["tasks"][0]
    metrics = task["metrics"]
    assert metrics["hits"] + metrics["misses"] == task["samples"] == 9
    assert metrics["hits"] == pytest.approx(metrics["accuracy"] * 9)  # the same predictions as the accuracy
    code, _, err = run_cli(["evaluate", model, "--data", labeled, "--metric", tmp_path / "missing.py", "-q"], capsys)
    assert_one_line_error(code, err, "missing.py")


def test_dry_run_says_what_data_pass_would_run_and_reads_no_data(digit_hub, local_hub, capsys):
    m, d = digit_hub["models"], digit_hub["datasets"]
    local_hub.requests.clear()
    code, out, err = run_cli(["merge", m["upright"], m["mirrored"], "--method", "fisher", "--data", f"{d['digits']}:test",
                              "--param", "samples=40", "--dry-run"], capsys)
    assert code == 0, err
    assert "statistics stage: diagonal Fisher" in out and "on 40 images of each source's data" in out
    assert f"← {d['digits']}:test" in out
    assert not [path for _, path, _ in local_hub.requests if "/datasets/" in path]  # no dataset was read


def test_fine_tuning_options_without_data_warn_that_nothing_is_fine_tuned(make_source, tmp_path, capsys):
    a, b = make_source("vit", 3, seed=1), make_source("vit", 2, seed=2)
    code, _, err = run_cli(["merge", a, b, "--method", "fusion", "--param", "finetune_epochs=5",
                            "--output", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    assert "finetune_epochs act only with --data" in err
    code, _, err = run_cli(["merge", a, b, "--method", "fusion", "--output", tmp_path / "plain", "-q"], capsys)
    assert code == 0 and "act only with --data" not in err


def test_a_relative_eval_data_folder_is_pinned_as_an_absolute_path(make_source, tmp_path, capsys, monkeypatch):
    """``--eval-data`` given relative to the working folder is written into ``hfmerge.yaml`` as ``--data`` folders are,
    absolute, so ``hfmerge run hfmerge.yaml`` plans the same merge from any folder of this machine."""
    from test_every_method import random_images

    source = make_source("vit", 3, seed=1)
    for label in ("class_0", "class_1"):
        random_images(tmp_path / "work" / "labeled" / label, count=2)
    monkeypatch.chdir(tmp_path / "work")
    code, _, err = run_cli(["merge", source, source, "--method", "average", "--eval-data", "labeled",
                            "--output", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    pinned = yaml.safe_load((tmp_path / "out" / "hfmerge.yaml").read_text())
    assert pinned["eval_data"] == [{"dataset": str(tmp_path / "work" / "labeled")}]
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["run", tmp_path / "out" / "hfmerge.yaml", "--output", tmp_path / "again", "--dry-run"],
                             capsys)
    assert code == 0, err
    assert f"evaluation: {tmp_path / 'work' / 'labeled'}" in out
