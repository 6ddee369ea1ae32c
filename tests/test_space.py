"""The demo Space: the app's predictions checked against transformers, `hfmerge space` writing and pushing it,
the pushed Space running from its own files, bad input, and one run in headless Chromium."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli
from huggingface_hub import SpaceCard, snapshot_download

from hfmerge.cli import main
from hfmerge.publish.manifest import MANIFEST_FILE
from hfmerge.testing.browser import chromium_missing, headless_chromium, show_image
from hfmerge.testing.ports import free_port
from hfmerge.testing.space_app import running_space
from hfmerge.testing.tiny import save_tiny, spread_weights, tiny_model

gr = pytest.importorskip("gradio", reason="the Space tests need the `space` extra: pip install -e .[space]")
gradio_client = pytest.importorskip("gradio_client")
from hfmerge.spaces import app, inference  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
LABELS = ["cat", "dog", "bird", "fish"]


@pytest.fixture(scope="module")
def hub_models(publish):
    """Two ViT classifiers and two SegFormers on the local Hub, and each pair's average merge pushed back."""
    shas = {}
    for family, stem in (("vit", "space-vit"), ("segformer", "space-seg")):
        for seed, name in ((1, "a"), (2, "b")):
            model = tiny_model(family, len(LABELS), seed=seed, labels=LABELS)
            if family == "segformer":
                spread_weights(model, seed=seed)
            shas[f"org/{stem}-{name}"] = publish(f"org/{stem}-{name}", model=model, family=family)
        code = main(["merge", f"org/{stem}-a", f"org/{stem}-b", "--method", "average",
                     "--push-to-hub", f"org/{stem}-merged", "--quiet"])
        assert code == 0
    return shas


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    """A 64×48 noise image: every model sees structure, and the map varies across it."""
    path = tmp_path_factory.mktemp("images") / "noise.png"
    pixels = np.random.default_rng(0).integers(0, 256, size=(48, 64, 3), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    return path


@contextmanager
def serving(demo):
    """Serve ``demo`` on loopback for the block; yield its URL."""
    port = free_port()
    demo.queue(default_concurrency_limit=2)
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True,
                max_file_size=app.MAX_UPLOAD)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        demo.close()


def client_for(url):
    return gradio_client.Client(url, verbose=False)


def expected_predictions(repo_id, sha, image_path, kind):
    """What plain transformers says for one image: class probabilities, or pixel shares of the
    segmentation map made by transformers' SegFormer post-processing (not the app's code)."""
    folder = snapshot_download(repo_id, revision=sha)
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    image = PIL.Image.open(image_path).convert("RGB")
    pixel_values = processor(images=image, return_tensors="pt")["pixel_values"]
    if kind == "classification":
        model = transformers.AutoModelForImageClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            probabilities = model(pixel_values=pixel_values).logits[0].softmax(-1)
        scores = {model.config.id2label[i]: float(p) for i, p in enumerate(probabilities)}
    else:
        model = transformers.AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
        with torch.no_grad():
            outputs = model(pixel_values=pixel_values)
        label_map = transformers.SegformerImageProcessorPil().post_process_semantic_segmentation(
            outputs, target_sizes=[(image.height, image.width)])[0]
        counts = torch.bincount(label_map.flatten(), minlength=len(LABELS)).double()
        scores = {model.config.id2label[i]: float(c / counts.sum()) for i, c in enumerate(counts) if c > 0}
    return dict(sorted(scores.items(), key=lambda item: -item[1])[: inference.TOP_K])


def assert_matches(answer, expected):
    scores = [entry["score"] for entry in answer]
    assert scores == sorted(scores, reverse=True)
    assert {e["label"] for e in answer} == set(expected)
    for entry in answer:
        assert entry["score"] == pytest.approx(expected[entry["label"]], abs=6e-5)


@pytest.mark.parametrize(("stem", "kind", "task"), [
    ("space-vit", "classification", "image-classification"),
    ("space-seg", "segmentation", "image-segmentation"),
])
def test_predict_endpoint_answers_for_merged_and_sources(hub_models, image_file, stem, kind, task):
    demo_models = inference.load_demo(f"org/{stem}-merged")
    assert not demo_models.notes
    with serving(app.build_demo(demo_models)) as url:
        answer = client_for(url).predict(gradio_client.handle_file(str(image_file)), api_name="/predict")

    assert answer["task"] == task
    assert answer["gate"] is None
    merged_sha = snapshot_download(f"org/{stem}-merged").rsplit("/", 1)[-1]
    assert_matches(answer["merged"], expected_predictions(f"org/{stem}-merged", merged_sha, image_file, kind))
    # the sources are the ones in hfmerge.yaml, pinned to the commits that were merged
    names = {f"org/{stem}-{n}@{hub_models[f'org/{stem}-{n}'][:7]}": f"org/{stem}-{n}" for n in ("a", "b")}
    assert set(answer["sources"]) == set(names)
    for name, repo_id in names.items():
        assert_matches(answer["sources"][name], expected_predictions(repo_id, hub_models[repo_id], image_file, kind))
    if kind == "segmentation":  # the maps differ between the sources, so the overlays compare something
        assert answer["sources"] != dict.fromkeys(answer["sources"], answer["merged"])


def test_mask2former_overlay_matches_its_processor(tmp_path, image_file):
    """Mask2Former goes through its processor's semantic post-processing; the legend names the classes drawn."""
    model = spread_weights(tiny_model("mask2former", len(LABELS), seed=3, labels=LABELS))
    folder = save_tiny(tmp_path / "m2f", "mask2former", model=model)
    demo_model = inference.load_model(str(folder))
    image = PIL.Image.open(image_file).convert("RGB")
    prediction = demo_model.predict(image)

    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    with torch.no_grad():
        outputs = model(pixel_values=processor(images=image, return_tensors="pt")["pixel_values"])
    label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[(48, 64)])[0]
    counts = torch.bincount(label_map.flatten(), minlength=len(LABELS))
    assert {t["label"]: t["score"] for t in prediction.top} == {
        LABELS[i]: round(float(c) / label_map.numel(), 4) for i, c in enumerate(counts) if c > 0}
    base, masks = prediction.overlay
    assert base.size == (64, 48)
    for mask, label in masks:  # each legend entry's mask is exactly that class's pixels
        assert np.array_equal(mask.astype(bool), (label_map == LABELS.index(label)).numpy())


def test_bad_uploads_get_a_message(hub_models, tmp_path, monkeypatch, image_file):
    demo_models = inference.load_demo("org/space-vit-merged")
    text = tmp_path / "notes.png"
    text.write_text("this is not an image")
    monkeypatch.setattr(app, "MAX_PIXELS", 2000)
    big = tmp_path / "big.png"
    PIL.Image.new("RGB", (60, 40)).save(big)
    with serving(app.build_demo(demo_models)) as url:
        client = client_for(url)
        with pytest.raises(gradio_client.exceptions.AppError, match="not an image this demo can read"):
            client.predict(gradio_client.handle_file(str(text)), api_name="/predict")
        with pytest.raises(gradio_client.exceptions.AppError, match="60×40 pixels; images up to 0.002 megapixels"):
            client.predict(gradio_client.handle_file(str(big)), api_name="/predict")
        # the server is still up and answering after refusing both
        monkeypatch.setattr(app, "MAX_PIXELS", 10_000)
        monkeypatch.setattr(app, "MAX_SIDE", 32)
        answer = client.predict(gradio_client.handle_file(str(image_file)), api_name="/predict")
    assert answer["notes"] == ["The image was scaled down from 64×48 to 32×24."]
    assert len(answer["merged"]) == len(LABELS)


def test_sources_that_fail_to_load_leave_the_merged_model_alone(hub_models, publish):
    demo_models = inference.load_demo("org/space-vit-merged", sources=["org/space-vit-a", "org/no-such-model"])
    assert [m.name for m in demo_models.sources] == ["org/space-vit-a"]
    assert len(demo_models.notes) == 1 and "org/no-such-model could not be loaded" in demo_models.notes[0]

    publish("org/space-plain", family="vit", seed=4, labels=LABELS)
    plain = inference.load_demo("org/space-plain")
    assert plain.sources == [] and "not made by hfmerge" in plain.notes[0]


def test_load_notes_reach_the_predict_api(hub_models, image_file):
    """What did not load is in /predict's answer too, not only on the page."""
    demo_models = inference.load_demo("org/space-vit-merged", sources=["org/no-such-model"])
    assert len(demo_models.notes) == 1
    with serving(app.build_demo(demo_models)) as url:
        answer = client_for(url).predict(gradio_client.handle_file(str(image_file)), api_name="/predict")
    assert answer["sources"] == {} and answer["notes"] == demo_models.notes


def test_space_for_a_model_not_made_by_hfmerge_shows_it_alone(hub_models, publish, tmp_path, capsys):
    publish("org/space-plain", family="vit", seed=4, labels=LABELS)
    code, _, err = run_cli(["space", "org/space-plain", "--output", tmp_path / "space"], capsys)
    assert code == 0
    assert "has no hfmerge.yaml (not made by hfmerge); the Space shows it alone" in err
    assert json.loads((tmp_path / "space" / "space_config.json").read_text())["sources"] == []


def test_app_refuses_a_missing_model_in_one_line(hub_models, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main(["--model", "org/no-such-model"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("app.py: error: org/no-such-model could not be loaded") and "\n" not in err


def test_gate_probabilities_are_named_by_task(image_file):
    """A gated merge's outputs carry the gate's task probabilities; the app names them from the config."""

    class Gated(torch.nn.Module):
        config = SimpleNamespace(gate_labels=["digits", "letters"])

        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(3, 2)

        def forward(self, pixel_values):
            pooled = pixel_values.mean(dim=(2, 3))
            return SimpleNamespace(logits=self.linear(pooled), gate_probs=torch.tensor([[0.25, 0.75]]))

    processor = transformers.ViTImageProcessorPil(size={"height": 8, "width": 8})
    demo_model = inference.DemoModel("gated", Gated(), processor, "classification", {0: "seven", 1: "A"})
    prediction = demo_model.predict(PIL.Image.open(image_file).convert("RGB"))
    assert prediction.gate == {"digits": 0.25, "letters": 0.75}
    assert {t["label"] for t in prediction.top} == {"seven", "A"}


def test_evaluation_section_and_plots_come_from_the_card(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "plots").mkdir()
    PIL.Image.new("RGB", (8, 8), "red").save(folder / "plots" / "accuracy.png")
    (folder / "README.md").write_text(
        "---\nlicense: mit\n---\n# Model\n\n## Sources\n\nnot shown\n\n"
        "## Evaluation\n\n| model | accuracy |\n|---|---|\n| merged | 0.91 |\n\n"
        "![accuracy per task](plots/accuracy.png)\n![outside](../secret.png)\n\n## Usage\n\nnot shown either\n"
    )
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "secret.png")
    text, plots = inference.read_card(str(folder))
    assert text.startswith("## Evaluation") and "| merged | 0.91 |" in text
    assert "not shown" not in text and "![" not in text
    assert plots == {"plots/accuracy.png": folder / "plots" / "accuracy.png"}


def test_evaluation_panel_shows_an_hfmerge_card_table_and_chart_or_the_model_index(tmp_path):
    from hfmerge.eval.report import EvaluationReport, ModelEvaluation, TaskResult
    from hfmerge.publish.card import EVALUATION_SVG, update_card

    report = EvaluationReport(models=[
        ModelEvaluation("merged", "merged", [TaskResult("digits", "org/digits", "test", {"accuracy": 0.875}, 8)],
                        100, 2000, 1.5, 4),
        ModelEvaluation("vit-a", "source", [TaskResult("digits", "org/digits", "test", {"accuracy": 0.5}, 8)],
                        100, 2000, 1.5, 4),
    ])
    evaluated = tmp_path / "evaluated"
    evaluated.mkdir()
    (evaluated / "README.md").write_text(update_card("# Model\n\n## Usage\n\nnot shown\n", report, "org/m"))
    (evaluated / EVALUATION_SVG).write_text(report.bar_chart_svg())
    text, plots = inference.read_card(str(evaluated))
    assert "| merged | merged | 0.8750 |" in text and "| vit-a | source | 0.5000 |" in text
    assert "not shown" not in text and "![" not in text
    assert plots == {EVALUATION_SVG: evaluated / EVALUATION_SVG}
    # a card with model-index metadata but no evaluation section: the table is made from the metadata
    indexed = tmp_path / "indexed"
    indexed.mkdir()
    card = update_card("# Model\n", report, "org/m")
    (indexed / "README.md").write_text(card.split("## Evaluation")[0])
    text, plots = inference.read_card(str(indexed))
    assert text.splitlines()[0] == "## Evaluation of org/m" and plots == {}
    assert "| digits | org/digits | test | accuracy | 0.8750 |" in text
    # neither: no panel
    (indexed / "README.md").write_text("---\nlicense: mit\n---\n# Model\n")
    assert inference.read_card(str(indexed)) == ("", {})


# --------------------------------------------------------------------------- hfmerge space


def test_space_output_writes_a_folder_that_runs_alone(hub_models, tmp_path, capsys, image_file):
    out = tmp_path / "space"
    code, stdout, _ = run_cli(["space", "org/space-vit-merged", "--output", out], capsys)
    assert code == 0 and stdout.strip() == f"written: {out}"
    assert sorted(p.name for p in out.iterdir()) == [  # and the list of them, for a later --overwrite
        ".hfmerge-files.json", "README.md", "app.py", "examples", "inference.py", "requirements.txt",
        "source_ref.py", "space_config.json"]
    for name in ("app.py", "inference.py"):
        assert (out / name).read_bytes() == (ROOT / "spaces" / name).read_bytes()
    assert (out / "source_ref.py").read_bytes() == (ROOT / "hfmerge" / "source_ref.py").read_bytes()  # the core's
    assert list((out / "examples").iterdir()) == []  # no evaluation data, no merge data: no examples
    card = SpaceCard.load(out / "README.md")
    assert (card.data.sdk, card.data.app_file, card.data.sdk_version) == ("gradio", "app.py", gr.__version__)
    assert card.data.models == ["org/space-vit-merged", "org/space-vit-a", "org/space-vit-b"]
    settings = json.loads((out / "space_config.json").read_text())
    pins = [f"org/space-vit-{n}@{hub_models[f'org/space-vit-{n}']}" for n in ("a", "b")]
    assert settings == {"model": "org/space-vit-merged", "sources": pins}
    assert "hfmerge" not in (out / "requirements.txt").read_text()
    # the Python API writes the same folder
    import hfmerge

    again = hfmerge.save_space(hfmerge.SpaceOptions("org/space-vit-merged"), tmp_path / "again")
    def space_files(folder):  # each folder's list of hfmerge's files has its own times
        return {p.relative_to(folder): p.read_bytes() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST_FILE}

    assert space_files(again) == space_files(out)

    with running_space(out, tmp_path / "space.log", without_hfmerge=True) as url:
        answer = client_for(url).predict(gradio_client.handle_file(str(image_file)), api_name="/predict")
    with serving(app.build_demo(inference.load_demo("org/space-vit-merged"))) as url:
        in_process = client_for(url).predict(gradio_client.handle_file(str(image_file)), api_name="/predict")
    assert answer == in_process


def test_a_local_space_names_its_model_relative_to_itself_and_runs_from_another_folder(tmp_path, capsys,
                                                                                        image_file):
    """``hfmerge space FOLDER --output``: no path of this machine in what is written; the model is named relative to
    the Space's folder, and the app finds it so, whichever folder it is started from."""
    model = save_tiny(tmp_path / "models" / "merged", "vit", len(LABELS), seed=3, labels=LABELS)
    out = tmp_path / "spaces" / "demo"
    code, _, err = run_cli(["space", model, "--output", out, "--no-sources"], capsys)
    assert code == 0, err
    settings = json.loads((out / "space_config.json").read_text())
    assert settings == {"model": "../../models/merged", "sources": []}
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".txt"):
            assert str(tmp_path) not in path.read_text(), path.name
    elsewhere = tmp_path / "elsewhere"  # running_space starts the app in the log's folder
    elsewhere.mkdir()
    with running_space(out, elsewhere / "space.log", without_hfmerge=True) as url:
        answer = client_for(url).predict(gradio_client.handle_file(str(image_file)), api_name="/predict")
    expected = inference.load_demo(str(model)).merged.predict(app.open_image(image_file)[0]).top
    assert answer["merged"] == expected


def _labeled_images(folder: Path) -> Path:
    """Two classes of three distinct images each, named as the tiny models' labels."""
    for label in range(2):
        for i in range(3):
            pixels = np.full((24, 24, 3), 40 * (3 * label + i), dtype=np.uint8)
            pixels[::2, ::3] = 255 - 30 * i
            (folder / LABELS[label]).mkdir(parents=True, exist_ok=True)
            PIL.Image.fromarray(pixels).save(folder / LABELS[label] / f"{i}.png")
    return folder


def _pixels(path: Path) -> bytes:
    with PIL.Image.open(path) as image:
        return image.convert("RGB").tobytes()


def _assert_examples_come_from(out: Path, data: Path) -> None:
    examples = sorted((out / "examples").iterdir())
    assert 1 <= len(examples) <= 4
    assert {_pixels(p) for p in examples} <= {_pixels(p) for p in data.rglob("*.png")}


@pytest.mark.parametrize("given", ["eval data", "merge data", "neither"])
def test_examples_come_from_the_models_evaluation_data_else_its_merge_data_else_none(given, tmp_path, capsys):
    """A digit model is shown digits, not a pagoda: the examples are drawn from the data its hfmerge.yaml names."""
    sources = [save_tiny(tmp_path / f"source-{seed}", "vit", len(LABELS), seed=seed, labels=LABELS) for seed in (1, 2)]
    data = _labeled_images(tmp_path / "pets")
    extra = {"eval data": ["--method", "average", "--eval-data", data],
             "merge data": ["--method", "regmean", "--data", data, "--param", "samples=4"],
             "neither": ["--method", "average"]}[given]
    code, _, err = run_cli(["merge", *sources, *extra, "--output", tmp_path / "merged", "-q"], capsys)
    assert code == 0, err
    out = tmp_path / "space"
    code, _, err = run_cli(["space", tmp_path / "merged", "--output", out, "--no-sources"], capsys)
    assert code == 0, err
    readme = (out / "README.md").read_text()
    assert not {p.name for p in (out / "examples").iterdir()} & {"china.jpg", "flower.jpg"}
    if given == "neither":
        assert list((out / "examples").iterdir()) == [] and "Example images" not in readme
        return
    _assert_examples_come_from(out, data)
    what = "the model's evaluation data" if given == "eval data" else "the data the merge read"
    assert "Example images: drawn from `pets" in readme and what in readme
    assert str(tmp_path) not in readme


def test_examples_come_from_the_datasets_the_cards_model_index_names(publish, hub_api, tmp_path, capsys):
    """A model evaluated by ``hfmerge evaluate --update-card`` (or by anyone) names its data in ``model-index``."""
    data = _labeled_images(tmp_path / "pets")
    hub_api.create_repo("org/space-example-pets", repo_type="dataset", exist_ok=True)
    sha = hub_api.upload_folder(folder_path=str(data), repo_id="org/space-example-pets", repo_type="dataset").oid
    readme = ("---\nmodel-index:\n- name: indexed\n  results:\n  - task: {type: image-classification}\n"
              "    dataset: {type: org/space-example-pets, name: org/space-example-pets, split: train, "
              f"revision: {sha}}}\n    metrics:\n    - {{type: accuracy, value: 0.5}}\n---\n# Indexed\n")
    publish("org/space-indexed", model=tiny_model("vit", len(LABELS), seed=4, labels=LABELS), family="vit",
            readme=readme)
    out = tmp_path / "space"
    code, _, err = run_cli(["space", "org/space-indexed", "--output", out], capsys)
    assert code == 0, err
    _assert_examples_come_from(out, data)
    assert "`org/space-example-pets:train`" in (out / "README.md").read_text()


def test_space_is_pushed_to_the_hub_and_runs_from_its_repo(hub_models, local_hub, tmp_path, capsys, image_file):
    code, stdout, _ = run_cli(["space", "org/space-seg-merged", "--space-id", "org/space-seg-demo"], capsys)
    assert code == 0
    repo = local_hub.repo("org/space-seg-demo", "space")
    assert repo is not None and repo.sdk == "gradio" and not repo.private
    assert f"pushed: {local_hub.endpoint}/spaces/org/space-seg-demo/commit/{repo.branches['main']}" in stdout
    assert len(repo.history) == 2  # the repo's creation, then the Space in one commit
    files = repo.commits[repo.branches["main"]]
    assert {"app.py", "README.md", "requirements.txt", "space_config.json"} <= set(files)

    folder = Path(snapshot_download("org/space-seg-demo", repo_type="space", local_dir=tmp_path / "clone"))
    with running_space(folder, tmp_path / "space.log", without_hfmerge=True) as url:
        answer = client_for(url).predict(gradio_client.handle_file(str(image_file)), api_name="/predict")
    assert answer["task"] == "image-segmentation"
    assert_matches(answer["merged"], expected_predictions(
        "org/space-seg-merged", snapshot_download("org/space-seg-merged").rsplit("/", 1)[-1], image_file,
        "segmentation"))
    assert len(answer["sources"]) == 2

    # Pushing again with other examples replaces them in one more commit.
    own = tmp_path / "street.png"
    PIL.Image.new("RGB", (32, 32), "gray").save(own)
    code, _, _ = run_cli(["space", "org/space-seg-merged", "--space-id", "org/space-seg-demo",
                          "--examples", own, "--no-sources"], capsys)
    assert code == 0
    files = repo.commits[repo.branches["main"]]
    assert sorted(p for p in files if p.startswith("examples/")) == ["examples/street.png"]
    assert json.loads(files["space_config.json"])["sources"] == []
    assert "Example images:" not in files["README.md"].decode()


@pytest.mark.parametrize(("args", "fragments"), [
    (["org/no-such-model", "--space-id", "org/x-demo"], ["org/no-such-model is not a folder here and does not exist on the Hub"]),
    (["org/space-vit-merged", "--space-id", "someone-else/demo"], ["cannot push to someone-else/demo"]),
    (["org/space-vit-merged", "--output", "NEW", "--space-id", "someone-else/demo"], ["cannot push to someone-else/demo"]),
    (["org/space-vit-merged", "--space-id", "bad id!"], ["--space-id 'bad id!' is not a valid repo id"]),
    (["org/space-vit-merged", "--space-id", "org/x-demo", "--sources", "org/no-such-model"],
     ["org/no-such-model is not a folder here and does not exist on the Hub"]),
    (["org/space-vit-merged", "--space-id", "org/x-demo", "--sources", "org/space-vit-a", "--no-sources"],
     ["contradict"]),
    (["org/space-feature", "--space-id", "org/x-demo"], ["ViTModel", "classification and segmentation"]),
    (["LOCAL", "--space-id", "org/x-demo"], ["is a local folder", "--push-to-hub"]),
    (["LOCAL"], ["is a local folder", "--push-to-hub", "--output FOLDER to write the Space's folder only"]),
    (["org/space-vit-merged", "--space-id", "org/x-demo", "--examples", "NOT_IMAGE"], ["is not an image"]),
    (["org/space-vit-merged", "--output", "TAKEN"], ["has files and no space_config.json", "choose another path"]),
])
def test_space_bad_input_is_one_line_and_writes_nothing(hub_models, publish, local_hub, tmp_path, capsys, args,
                                                        fragments):
    model = tiny_model("vit", seed=5)
    feature = transformers.ViTModel(model.config)
    feature.config.architectures = ["ViTModel"]
    publish("org/space-feature", model=feature, family="vit")
    local = save_tiny(tmp_path / "local-merged", "vit")
    not_image = tmp_path / "notes.png"
    not_image.write_text("hello")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    swap = {"LOCAL": str(local), "NOT_IMAGE": str(not_image), "TAKEN": str(taken), "NEW": str(tmp_path / "new-space")}
    before = set(local_hub.repos)

    code, out, err = run_cli(["space", *[swap.get(a, a) for a in args]], capsys)

    assert_one_line_error(code, err, *fragments)
    assert "--space-id" in args or "--space-id" not in err  # never a flag the user did not give
    assert out == ""
    assert set(local_hub.repos) - before == {("model", "org/space-feature")} - before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["local-merged", "notes.png", "taken"]
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- browser


def test_page_in_headless_chromium(hub_models, image_file, tmp_path):
    """Load the page, upload an image, read each model's top label off the page, keep a screenshot;
    then upload a file that is not an image and read the message."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    missing = chromium_missing()
    if missing:
        pytest.skip(f"{missing}; `make test` installs it where it can")
    browser = headless_chromium()
    demo_models = inference.load_demo("org/space-vit-merged")
    expected = {m.name: m.predict(app.open_image(image_file)[0]).top[0] for m in
                [demo_models.merged, *demo_models.sources]}
    try:
        with serving(app.build_demo(demo_models)) as url:
            boxes = ["merged", "source-1", "source-2"]
            texts = show_image(browser, url, image_file, boxes,
                               ready=lambda text: any(label in text for label in LABELS))
            ARTIFACTS.mkdir(exist_ok=True)
            screenshot = ARTIFACTS / "space-classification.png"
            assert browser.save_screenshot(str(screenshot))
            # a file that is not an image gets the app's message on the page, and the page stays up
            fake = tmp_path / "fake.png"
            fake.write_text("not pixels")
            browser.find_element(By.CSS_SELECTOR, "#input-image input[type=file]").send_keys(str(fake))
            page = lambda b: b.find_element(By.TAG_NAME, "body").text  # noqa: E731
            WebDriverWait(browser, 60).until(lambda b: "fake.png is not an image this demo can read" in page(b))
            assert "Traceback" not in page(browser)
            assert browser.save_screenshot(str(ARTIFACTS / "space-not-an-image.png"))
    finally:
        browser.quit()
    names = [demo_models.merged.name, *(m.name for m in demo_models.sources)]
    for box, name in zip(boxes, names):
        lines = texts[box].splitlines()
        assert name in lines[0]
        assert lines[1] == expected[name]["label"]  # the top label, shown under the model's name
    assert screenshot.stat().st_size > 10_000


def test_models_with_the_same_name_keep_apart(tmp_path, image_file):
    """Two source folders with one name, same as the merged one's: each keeps its own entry in the JSON."""
    first = save_tiny(tmp_path / "one" / "model", "vit", seed=1, labels=LABELS)
    second = save_tiny(tmp_path / "two" / "model", "vit", seed=2, labels=LABELS)
    demo_models = inference.load_demo(str(first), sources=[str(first), str(second)])
    payload, _ = demo_models.predict(app.open_image(image_file)[0])
    assert list(payload["sources"]) == ["model (2)", "model (3)"]
    assert payload["sources"]["model (2)"] == payload["merged"]
    assert payload["sources"]["model (3)"] != payload["merged"]


def test_space_output_and_push_together_private(hub_models, local_hub, tmp_path, capsys):
    """--output with --space-id writes the folder and pushes exactly that folder; --private makes the Space private."""
    out = tmp_path / "space"
    code, stdout, _ = run_cli(["space", "org/space-vit-merged", "--space-id", "org/space-private-demo",
                               "--private", "--output", out, "--title", "Digits, merged"], capsys)
    assert code == 0 and stdout.startswith(f"written: {out}\npushed: ")
    repo = local_hub.repo("org/space-private-demo", "space")
    assert repo.private and repo.sdk == "gradio"
    files = repo.commits[repo.branches["main"]]
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert MANIFEST_FILE in written  # the folder's list of hfmerge's files stays on this machine
    assert {k: v for k, v in files.items() if k != ".gitattributes"} == {
        k: v for k, v in written.items() if k != MANIFEST_FILE}
    card = SpaceCard(files["README.md"].decode())
    assert card.data.title == "Digits, merged"
    assert 'Client("org/space-private-demo")' in card.text


def test_the_app_runs_as_a_script_from_the_source_tree():
    """README: ``python spaces/app.py --model ./merged``; beside app.py there is no source_ref.py in the tree."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "spaces" / "app.py"), "--help"], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--model" in done.stdout


_MALLOC_PROBE = """
import ctypes, importlib.util, os, sys
sys.path.insert(0, os.path.dirname(sys.argv[1]))  # inference.py beside it, as in a Space
spec = importlib.util.spec_from_file_location("app_probe", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
libc = ctypes.CDLL("libc.so.6")
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
bounded = module.bound_allocator()
libc.free(libc.malloc(20 << 20))  # glibc's default then raises its mmap threshold above 20 MB
before = libc.mallinfo2().hblks
block = libc.malloc(4 << 20)  # a decoded 1,200 x 900 image
print(bounded, libc.mallinfo2().hblks - before)
"""


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="glibc's allocator: Linux")
def test_the_app_bounds_its_memory_and_its_upload_cache(tmp_path):
    """Freed image buffers go back to the system, and uploads are deleted after a while (issue 20, item 16)."""
    folder = save_tiny(tmp_path / "vit", "vit")
    demo = app.build_demo(inference.load_demo(str(folder), sources=[]))
    assert demo.delete_cache == app.UPLOAD_CACHE and 0 < app.UPLOAD_CACHE[1] <= 3600
    # once bounded, a large block after a larger one freed is mapped on its own (given back when freed), not
    # carved from an arena that keeps it
    probe = subprocess.run([sys.executable, "-c", _MALLOC_PROBE, app.__file__], capture_output=True, text=True,
                           check=True)
    assert probe.stdout.split() == ["True", "1"]
