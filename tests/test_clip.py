"""CLIP task towers, as model-merging research publishes them: ``CLIPVisionModel`` fine-tunes of one ``CLIPModel``.

The towers are pushed to the local Hub and merged by repo id against the ``CLIPModel`` base; every merged tensor is
compared with a hand computation from the towers and the base's ``vision_model`` as plain transformers loads them.
The output loads as ``CLIPVisionModel``, and with ``--output-format clip`` as a ``CLIPModel`` whose text tower is
the base's, which ``pipeline("zero-shot-image-classification")`` runs. Zero-shot evaluation is checked against the
CLIP formula computed here.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from helpers import assert_one_line_error, run_cli
from PIL import Image

import hfmerge
from hfmerge.testing.tiny import save_tiny, spread_weights, tiny_config, tiny_model

BASE, TOWERS = "org/clip-base", ("org/clip-tower-a", "org/clip-tower-b")


def tower_from(base: transformers.CLIPModel, seed: int, architecture: str = "CLIPVisionModel") -> torch.nn.Module:
    """A fine-tune of ``base``'s image encoder: its weights plus a small random task vector."""
    config = tiny_config("clip" if architecture == "CLIPVisionModel" else "clip-projection")
    tower = getattr(transformers, architecture)(config).eval()
    state = {f"vision_model.{k}": v for k, v in base.vision_model.state_dict().items()}
    state["visual_projection.weight"] = base.visual_projection.weight
    own = tower.state_dict()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, value in own.items():
            source = state.get(name, state.get(f"vision_model.{name}"))
            value.copy_(source + 0.05 * torch.randn(value.shape, generator=generator))
    return tower


@pytest.fixture(scope="module")
def clip_hub(publish, tmp_path_factory):
    """A tiny CLIPModel base and two CLIPVisionModel towers fine-tuned from it, on the local Hub."""
    base = spread_weights(tiny_model("clip-model", seed=0)).eval()
    publish(BASE, model=base, family="clip-model")
    for seed, repo in enumerate(TOWERS, start=1):
        publish(repo, model=tower_from(base, seed), family="clip")
    return base


def loaded(repo: str) -> dict[str, torch.Tensor]:
    return hfmerge.load(repo).state_dict()


def base_vision() -> dict[str, torch.Tensor]:
    state = loaded(BASE)
    return {k.removeprefix("vision_model."): v for k, v in state.items() if k.startswith("vision_model.")}


def ties_by_hand(base: torch.Tensor, towers: list[torch.Tensor], density: float, scale: float) -> torch.Tensor:
    """TIES (Yadav et al. 2023, Alg. 1) on one tensor: keep each task vector's ⌊density · numel⌋ largest, elect
    the sign of the kept entries' sum, average the entries that agree with it."""
    trimmed = []
    for tower in towers:
        tau = tower - base
        k = int(density * tau.numel())  # ⌊density · numel⌋, as mergekit's per-tensor trim
        if k == 0:
            trimmed.append(torch.zeros_like(tau))
            continue
        threshold = tau.abs().flatten().kthvalue(tau.numel() - k + 1).values
        trimmed.append(torch.where(tau.abs() >= threshold, tau, 0.0))
    stacked = torch.stack(trimmed)
    sign = torch.sign(stacked.sum(0))
    agree = (torch.sign(stacked) == sign) & (stacked != 0)
    merged = (stacked * agree).sum(0) / agree.sum(0).clamp(min=1)
    return base + scale * merged


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties"])
def test_towers_merge_by_repo_id_against_a_clip_model_base(method, clip_hub, tmp_path):
    base = {} if method == "average" else {"base": BASE}
    params = {"lambda_": 0.7} if method != "average" else {}
    result = hfmerge.merge(list(TOWERS), method=method, progress=False, **base, **params)
    out = result.save(tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["CLIPVisionModel"]
    merged = transformers.CLIPVisionModel.from_pretrained(out).eval().state_dict()
    a, b = loaded(TOWERS[0]), loaded(TOWERS[1])
    theta0 = base_vision()
    assert set(merged) == set(a) == set(theta0)
    for name, value in merged.items():
        if method == "average":
            expected = (a[name] + b[name]) / 2
        elif method == "task_arithmetic":
            expected = theta0[name] + 0.7 * ((a[name] - theta0[name]) + (b[name] - theta0[name]))
        else:
            expected = ties_by_hand(theta0[name], [a[name], b[name]], density=0.2, scale=0.7)
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(merged["encoder.layers.0.mlp.fc1.weight"], a["encoder.layers.0.mlp.fc1.weight"])


def test_regmean_merges_towers_and_clip_models_through_their_image_encoder(clip_hub, make_source, tmp_path):
    """RegMean's statistics pass runs the image encoder (a CLIPModel's forward also needs text). Identical sources
    merge to themselves; two towers give linear weights that are neither source's nor their average."""
    from test_every_method import random_images

    images = str(random_images(tmp_path / "images", count=6, size=16))
    same = make_source("clip-model", seed=3)
    result = hfmerge.merge([str(same), str(same)], method="regmean", data=[images], progress=False)
    out, expected = result.save(tmp_path / "same"), hfmerge.load(str(same)).state_dict()
    for name, value in transformers.CLIPModel.from_pretrained(out).state_dict().items():
        torch.testing.assert_close(value, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert "carried, not merged (the family's not_merged) from the anchor" in result.planned.describe()
    count = sum(1 for name in expected if name.startswith(("text_model.", "text_projection.", "logit_scale")))
    assert (f"The text tower ({count} tensors) is not merged: it is the anchor's ({same.name}), unchanged."
            in (out / "README.md").read_text())

    towers = hfmerge.merge(list(TOWERS), method="regmean", data=[images], progress=False)
    merged = towers.save(tmp_path / "towers")
    weight = "encoder.layers.1.self_attn.k_proj.weight"
    value = transformers.CLIPVisionModel.from_pretrained(merged).state_dict()[weight]
    a, b = loaded(TOWERS[0])[weight], loaded(TOWERS[1])[weight]
    assert not torch.allclose(value, (a + b) / 2, atol=1e-5) and not torch.allclose(value, a, atol=1e-5)


def test_clip_output_format_loads_as_clip_model_and_runs_zero_shot(clip_hub, tmp_path):
    result = hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, lambda_=0.5, output_format="clip",
                           progress=False)
    tower = hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, lambda_=0.5, progress=False)
    out, tower_out = result.save(tmp_path / "clip"), tower.save(tmp_path / "tower")
    model = transformers.CLIPModel.from_pretrained(out).eval()
    state, base = model.state_dict(), loaded(BASE)
    merged_tower = transformers.CLIPVisionModel.from_pretrained(tower_out).state_dict()
    assert set(state) == set(base)
    for name, value in state.items():
        inner = name.removeprefix("vision_model.")
        expected = merged_tower[inner] if name.startswith("vision_model.") else base[name]
        assert torch.equal(value, expected), name
    assert "from the base (clip format): " in result.planned.describe()
    card = (out / "README.md").read_text()
    assert "pipeline_tag: zero-shot-image-classification" in card

    pipe = transformers.pipeline("zero-shot-image-classification", model=str(out))
    image = Image.fromarray((torch.rand(20, 20, 3, generator=torch.Generator().manual_seed(0)) * 255)
                            .to(torch.uint8).numpy())
    scores = {r["label"]: r["score"] for r in pipe(image, candidate_labels=["cat", "dog", "bird"])}
    processor = transformers.CLIPProcessor.from_pretrained(out)
    prompts = [f"This is a photo of {label}." for label in ("cat", "dog", "bird")]  # the pipeline's template
    inputs = processor(text=prompts, images=image, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model(**inputs).logits_per_image.softmax(-1)[0]
    for i, label in enumerate(("cat", "dog", "bird")):
        assert scores[label] == pytest.approx(float(expected[i]), abs=1e-4)
    assert max(scores.values()) - min(scores.values()) > 1e-3  # the classes are told apart


def labeled_folder(folder, classes=("cat", "dog"), per_class=4, size=20):
    generator = torch.Generator().manual_seed(1)
    for label in classes:
        (folder / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = (torch.rand(size, size, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / label / f"{i}.png")
    return folder


def zero_shot_accuracy_by_hand(tower_folder, base_folder, data_folder, prompts) -> float:
    """CLIP's zero-shot classification computed here: mean normalised prompt embeddings per class, the image's
    normalised projected embedding, argmax of the cosines."""
    clip = transformers.CLIPModel.from_pretrained(base_folder).eval()
    tower = transformers.CLIPVisionModel.from_pretrained(tower_folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(base_folder)
    classes = sorted(p.name for p in data_folder.iterdir())
    with torch.no_grad():
        weights = []
        for label in classes:
            tokens = processor.tokenizer([p.format(label) for p in prompts], padding=True, return_tensors="pt")
            text = clip.text_projection(clip.text_model(**tokens).pooler_output)
            mean = torch.nn.functional.normalize(text, dim=-1).mean(0)
            weights.append(torch.nn.functional.normalize(mean, dim=-1))
        weights = torch.stack(weights)
        right = total = 0
        for index, label in enumerate(classes):
            for path in sorted((data_folder / label).iterdir()):
                pixels = processor(images=Image.open(path).convert("RGB"), return_tensors="pt")["pixel_values"]
                embedded = clip.visual_projection(tower(pixel_values=pixels).pooler_output)
                predicted = int((torch.nn.functional.normalize(embedded, dim=-1) @ weights.T).argmax())
                right += predicted == index
                total += 1
    return right / total


def test_evaluate_scores_a_tower_zero_shot_with_the_base_text_tower(clip_hub, tmp_path, capsys):
    from huggingface_hub import snapshot_download

    data = labeled_folder(tmp_path / "pets")
    tower = hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, progress=False).save(tmp_path / "tower")
    prompts = ["a photo of a {}.", "a drawing of a {}."]
    report = tmp_path / "report.json"
    args = ["evaluate", str(tower), "--data", str(data), "--base", BASE, "--json", str(report), "-q"]
    code, out, err = run_cli([*args, *[f"--prompt={p}" for p in prompts]], capsys)
    assert code == 0, err
    rows = json.loads(report.read_text())["models"]
    accuracy = rows[0]["tasks"][0]["metrics"]["accuracy"]
    base_folder = snapshot_download(BASE)
    assert accuracy == pytest.approx(zero_shot_accuracy_by_hand(tower, tmp_path.joinpath(base_folder), data, prompts))
    assert rows[0]["tasks"][0]["kind"] == "zero-shot-image-classification"
    assert rows[0]["zero_shot"] == {"text_tower": BASE, "prompts": prompts, "default_prompts": False}
    assert "`a photo of a {}.`, `a drawing of a {}.` and embedded by the text tower of org/clip-base;" in out

    code, _, err = run_cli(["evaluate", str(tower), "--data", str(data), "-q"], capsys)
    assert_one_line_error(code, err, "zero-shot classification with a text tower", "give --base")
    code, _, err = run_cli(["evaluate", str(tower), "--data", str(data), "--base", BASE, "--compare", *TOWERS,
                            "--ensemble", "-q"], capsys)
    assert_one_line_error(code, err, "which hfmerge does not ensemble", "drop --ensemble")

    config = tiny_config("clip-model")
    config.vision_config.num_hidden_layers = 1  # another CLIP: its image encoder is one layer deep
    other = save_tiny(tmp_path / "other-clip", "clip-model", model=transformers.CLIPModel(config))
    code, _, err = run_cli(["evaluate", str(tower), "--data", str(data), "--base", str(other), "-q"], capsys)
    assert_one_line_error(code, err, "not shaped as the text tower's CLIPModel's (num_hidden_layers 2 ≠ 1)",
                          "give --base the pre-trained CLIPModel it was fine-tuned from")


def test_merge_evaluates_towers_zero_shot_in_the_card(clip_hub, tmp_path):
    data = labeled_folder(tmp_path / "pets")
    result = hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, eval_data=[str(data)], progress=False)
    card = (result.save(tmp_path / "out") / "README.md").read_text()
    assert "Zero-shot rows classify each task's images among that task's class names" in card
    assert [row.role for row in result.evaluation.models] == ["merged", "source", "source"]


def test_a_clip_space_starts_with_its_evaluation_class_names_as_labels(clip_hub, tmp_path, capsys):
    """The labels box of a CLIP merge's Space starts with the class names of the merge's evaluation data (each once),
    or the ``--labels`` given; an empty box chooses among those, and says so."""
    pytest.importorskip("gradio", reason="the Space needs the `space` extra")
    gradio_client = pytest.importorskip("gradio_client")
    from hfmerge.spaces import app, inference
    from test_space import client_for, serving

    from hfmerge.publish.space import SpaceOptions, plan_space

    first = labeled_folder(tmp_path / "pets", classes=("cat", "dog"))
    second = labeled_folder(tmp_path / "more-pets", classes=("dog", "owl"))
    merged = hfmerge.merge(list(TOWERS), method="average", base=BASE, output_format="clip",
                           eval_data=[str(first), str(second)], progress=False).save(tmp_path / "merged")
    assert plan_space(SpaceOptions(model=str(merged)), for_hub=False).labels == ["cat", "dog", "owl"]
    chosen = plan_space(SpaceOptions(model=str(merged), labels=["fox", "hen", "fox"]), for_hub=False)
    assert chosen.labels == ["fox", "hen"]
    space = tmp_path / "space"
    code, _, err = run_cli(["space", merged, "--output", space, "--labels", "fox", "hen"], capsys)
    assert code == 0, err
    assert json.loads((space / "space_config.json").read_text())["labels"] == ["fox", "hen"]
    code, _, err = run_cli(["space", merged, "--output", tmp_path / "refused", "--labels", "cat, dog"], capsys)
    assert_one_line_error(code, err, "--labels 'cat, dog'", "without commas")
    assert not (tmp_path / "refused").exists()
    classifier = save_tiny(tmp_path / "vit", "vit")
    code, _, err = run_cli(["space", classifier, "--output", tmp_path / "refused", "--labels", "fox"], capsys)
    assert_one_line_error(code, err, "is a ViTForImageClassification with labels of its own", "drop --labels")
    assert not (tmp_path / "refused").exists()

    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
                    .numpy()).save(image)
    demo = inference.load_demo(str(merged), sources=[])
    with serving(app.build_demo(demo, labels=["cat", "dog", "owl"])) as url:
        client = client_for(url)
        empty = client.predict(gradio_client.handle_file(str(image)), " , ", api_name="/predict")
        typed = client.predict(gradio_client.handle_file(str(image)), "owl, cat, owl", api_name="/predict")
    assert {e["label"] for e in empty["merged"]} == {"cat", "dog", "owl"}
    assert empty["notes"] == ["no labels were typed: chose among cat, dog, owl"]
    assert {e["label"] for e in typed["merged"]} == {"owl", "cat"}
    assert typed["notes"] == []


def test_merge_scores_the_card_with_the_prompts_given(clip_hub, tmp_path):
    """``--prompt`` on a merge: the card's zero-shot accuracy is CLIP's formula with those templates (which score
    these images otherwise than the default ones), and the pinned recipe keeps them."""
    from huggingface_hub import snapshot_download

    from hfmerge.eval.zero_shot import PROMPTS

    data = labeled_folder(tmp_path / "animals", classes=("cat", "dog", "fish", "horse", "owl"), per_class=6)
    prompts = ["a blurry sketch of {}", "{}!"]
    result = hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, eval_data=[str(data)],
                           prompts=prompts, progress=False)
    out = result.save(tmp_path / "out")
    base = tmp_path.joinpath(snapshot_download(BASE))
    expected = zero_shot_accuracy_by_hand(out, base, data, prompts)
    assert expected != zero_shot_accuracy_by_hand(out, base, data, PROMPTS)  # else this test could not tell
    assert result.evaluation.merged().tasks[0].metrics["accuracy"] == pytest.approx(expected)
    assert hfmerge.Recipe.from_yaml(out / "hfmerge.yaml").prompts == prompts
    assert 'hypothesis_template="a blurry sketch of {}"' in (out / "README.md").read_text()  # the usage's prompt


@pytest.mark.parametrize(("arguments", "fragments"), [
    (["--method", "average", "--output-format", "clip"], ("--output-format clip writes a CLIPModel", "no --base")),
    (["--method", "task_arithmetic", "--base", TOWERS[0], "--output-format", "clip"],
     ("the base org/clip-tower-a is a CLIPVisionModel", "give --base a CLIPModel")),
    (["--method", "average", "--base", BASE, "--output-format", "vit"], ("clip merges have no such format",
                                                                           "choose clip")),
    (["--method", "average", "--eval-data", "FOLDER"], ("zero-shot classification with a text tower",
                                                        "give --base the pre-trained CLIPModel")),
    (["--method", "average", "--prompt", "a photo of a {}."], ("prompts score CLIP towers on --eval-data",
                                                               "drop --prompt")),
    (["--method", "average", "--base", BASE, "--eval-data", "FOLDER", "--prompt", "a photo"],
     ("prompt 'a photo' has no {}", "a photo of a {}.")),
])
def test_clip_mistakes_are_refused_in_one_line_and_nothing_is_written(arguments, fragments, clip_hub, tmp_path,
                                                                     capsys):
    data = labeled_folder(tmp_path / "pets")
    arguments = [str(data) if a == "FOLDER" else a for a in arguments]
    code, _, err = run_cli(["merge", *TOWERS, *arguments, "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "out").exists()


def test_a_family_without_output_formats_refuses_one(make_source, tmp_path, capsys):
    source = str(make_source("vit"))
    code, _, err = run_cli(["merge", source, source, "--method", "average", "--output-format", "clip",
                            "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "vit merges have no such format", "drop --output-format")

    code, _, err = run_cli(["merge", source, source, "--method", "average", "--eval-data", str(labeled_folder(
        tmp_path / "pets")), "--prompt", "a photo of a {}.", "--output", str(tmp_path / "out")], capsys)
    assert_one_line_error(code, err, "vit models have their own classifier", "drop --prompt")
    assert not (tmp_path / "out").exists()


def test_projection_towers_pair_with_a_tower_base_and_keep_their_projection(tmp_path):
    base = spread_weights(tiny_model("clip-model", seed=0)).eval()
    folders = [save_tiny(tmp_path / f"p{seed}", "clip-projection", model=tower_from(base, seed,
                                                                                    "CLIPVisionModelWithProjection"))
               for seed in (1, 2)]
    plain_base = save_tiny(tmp_path / "base", "clip", model=tower_from(base, 9))  # no projection: its base lacks it
    result = hfmerge.merge([str(f) for f in folders], method="task_arithmetic", base=str(plain_base), lambda_=1.0,
                           progress=False)
    state = transformers.CLIPVisionModelWithProjection.from_pretrained(result.save(tmp_path / "out")).state_dict()
    a, b = (hfmerge.load(str(f)).state_dict() for f in folders)
    theta0 = hfmerge.load(str(plain_base)).state_dict()
    for name, value in state.items():
        inner = name.removeprefix("vision_model.")
        expected = (theta0[inner] + (a[name] - theta0[inner]) + (b[name] - theta0[inner]) if inner in theta0
                    else None)
        if expected is None:  # the projection: the base has none, so the head policy averages it
            expected = (a[name] + b[name]) / 2
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)


def test_space_shows_a_clip_merge_zero_shot_for_the_labels_typed(clip_hub, tmp_path, capsys):
    """The Space of a merge written as a CLIPModel answers among the labels the user types: the merged model as
    ``pipeline("zero-shot-image-classification")`` does with the Space's prompt, each source tower with the merged
    model's (the base's) text tower, as computed here."""
    pytest.importorskip("gradio", reason="the Space needs the `space` extra")
    gradio_client = pytest.importorskip("gradio_client")
    from hfmerge.spaces import app
    from huggingface_hub import snapshot_download
    from test_space import client_for, serving

    hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, output_format="clip", progress=False,
                  push_to_hub="org/clip-merged")
    image = tmp_path / "image.png"
    Image.fromarray((torch.rand(24, 24, 3, generator=torch.Generator().manual_seed(3)) * 255).to(torch.uint8)
                    .numpy()).save(image)
    labels = ["cat", "dog", "bird", "fish"]
    demo = app.inference.load_demo("org/clip-merged")
    assert demo.task == "zero-shot-image-classification" and len(demo.sources) == 2 and not demo.notes
    with serving(app.build_demo(demo)) as url:
        answer = client_for(url).predict(gradio_client.handle_file(str(image)), ", ".join(labels),
                                         api_name="/predict")
    folder = snapshot_download("org/clip-merged")
    pipe = transformers.pipeline("zero-shot-image-classification", model=folder)
    expected = {r["label"]: r["score"] for r in pipe(Image.open(image), candidate_labels=labels,
                                                       hypothesis_template="a photo of a {}.")}
    assert {e["label"] for e in answer["merged"]} == set(labels)
    for entry in answer["merged"]:
        assert entry["score"] == pytest.approx(expected[entry["label"]], abs=6e-5)

    clip = transformers.CLIPModel.from_pretrained(folder).eval()
    processor = transformers.CLIPProcessor.from_pretrained(folder)
    tokens = processor.tokenizer([f"a photo of a {label}." for label in labels], padding=True, return_tensors="pt")
    pixels = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    for name, scores in answer["sources"].items():
        repo = name.split("@")[0]
        tower = transformers.CLIPVisionModel.from_pretrained(snapshot_download(repo)).eval()
        with torch.no_grad():
            texts = torch.nn.functional.normalize(clip.text_projection(clip.text_model(**tokens).pooler_output),
                                                  dim=-1)
            images = torch.nn.functional.normalize(clip.visual_projection(tower(pixel_values=pixels).pooler_output),
                                                   dim=-1)
            probabilities = (clip.logit_scale.exp() * images @ texts.T)[0].softmax(-1)
        for entry in scores:
            assert entry["score"] == pytest.approx(float(probabilities[labels.index(entry["label"])]), abs=6e-5)

    capsys.readouterr()  # the merge's own lines (the license warning) are not the refusal's
    code, _, err = run_cli(["space", TOWERS[0], "--output", str(tmp_path / "space")], capsys)
    assert_one_line_error(code, err, "a CLIP image encoder with no text tower", "--output-format clip")


def usage_code(card: str) -> str:
    """The Python code of a card's Usage section."""
    return card.split("## Usage", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]


def run_usage(card: str, folder, monkeypatch) -> list[dict]:
    """Run the card's usage snippet as a user would, in ``folder`` with an ``image.jpg``: its ``predictions``."""
    Image.fromarray((torch.rand(20, 20, 3, generator=torch.Generator().manual_seed(5)) * 255).to(torch.uint8)
                    .numpy()).save(folder / "image.jpg")
    monkeypatch.chdir(folder)
    namespace: dict = {}
    exec(compile(usage_code(card), "usage", "exec"), namespace)  # noqa: S102 - the card's own code, as a user runs it
    return namespace["predictions"]


def text_tower_tensors(repo: str) -> int:
    """How many tensors of ``repo``'s checkpoint are its text tower (the adapter's not_merged), by name."""
    from huggingface_hub import snapshot_download
    from safetensors import safe_open

    with safe_open(f"{snapshot_download(repo)}/model.safetensors", "pt") as weights:
        return sum(1 for key in weights.keys() if key.startswith(("text_model.", "text_projection.", "logit_scale")))


def test_card_of_a_clip_model_merge_says_no_labels_the_carried_text_tower_and_the_zero_shot_scoring(
        clip_hub, tmp_path, monkeypatch):
    """A merge of towers written as a CLIPModel, as a user reads its card: no labels of its own, the text tower the
    base's (not "every parameter averaged"), the prompts and text towers its evaluation used, and a usage snippet
    (the zero-shot pipeline) that runs."""
    from hfmerge.eval.report import ZeroShotScoring
    from hfmerge.eval.zero_shot import PROMPTS

    data = labeled_folder(tmp_path / "pets")
    result = hfmerge.merge(list(TOWERS), method="average", base=BASE, output_format="clip", eval_data=[str(data)],
                           push_to_hub="org/clip-card", progress=False)
    card = (result.save(tmp_path / "out") / "README.md").read_text()
    assert ("This clip model (`CLIPModel`, zero-shot-image-classification, classes named at inference, through a text "
            "tower) was made") in card
    assert "| model | revision | commit | weight |\n" in card  # no labels column
    method = card.split("## Method", 1)[1].split("## Sources", 1)[0]
    assert "Every parameter outside the text tower is averaged." in method and "BatchNorm" not in method
    assert "Every parameter is averaged" not in method and "classifier heads" not in method
    count = text_tower_tensors(BASE)
    assert count > 10  # the encoder's layers, the projection and the logit scale
    assert (f"The text tower ({count} tensors) is not merged: it is the base's (org/clip-base), unchanged; so is "
            "`visual_projection.weight`, which the sources lack.") in method  # CLIPVisionModel towers have none

    assert [row.zero_shot for row in result.evaluation.models] == [
        ZeroShotScoring("org/clip-card", list(PROMPTS), True), *[ZeroShotScoring(BASE, list(PROMPTS), True)] * 2]
    templates = ", ".join(f"`{p}`" for p in PROMPTS)
    assert (f"written into the prompt templates {templates} (hfmerge's defaults) and embedded by the model's own "
            "text tower (org/clip-card) and by the text tower of org/clip-base (org/clip-tower-a, org/clip-tower-b);"
            ) in card

    assert usage_code(card).startswith('from transformers import pipeline\n\nclassify = pipeline('
                                       '"zero-shot-image-classification", model="org/clip-card")')
    predictions = run_usage(card, tmp_path, monkeypatch)
    assert {p["label"] for p in predictions} == {"cat", "dog", "bird"}
    assert sum(p["score"] for p in predictions) == pytest.approx(1.0)


def test_card_of_a_tower_merge_pairs_it_with_its_base_text_tower_in_the_usage(clip_hub, tmp_path, monkeypatch):
    """A merged CLIPVisionModel's usage puts it into its base CLIPModel and runs the zero-shot pipeline: its scores
    are CLIP's formula with the base's text tower and the merged tower (not the base's own image encoder)."""
    from huggingface_hub import snapshot_download

    result = hfmerge.merge(list(TOWERS), method="task_arithmetic", base=BASE, lambda_=0.5,
                           push_to_hub="org/clip-tower-card", progress=False)
    card = (result.save(tmp_path / "out") / "README.md").read_text()
    assert "(`CLIPVisionModel`, image-feature-extraction, classes named at inference, through a text tower)" in card
    assert "is not merged" not in card  # a tower has no text tower to carry
    code = usage_code(card)
    assert 'clip = CLIPModel.from_pretrained("org/clip-base")' in code
    assert "hfmerge evaluate org/clip-tower-card --data DATASET --base org/clip-base" in code
    predictions = {p["label"]: p["score"] for p in run_usage(card, tmp_path, monkeypatch)}

    labels = ["cat", "dog", "bird"]
    clip = transformers.CLIPModel.from_pretrained(snapshot_download(BASE)).eval()
    processor = transformers.CLIPProcessor.from_pretrained(snapshot_download(BASE))
    tower = transformers.CLIPVisionModel.from_pretrained(snapshot_download("org/clip-tower-card")).eval()
    tokens = processor.tokenizer([f"a photo of a {label}." for label in labels], padding=True,
                                 return_tensors="pt")  # the snippet's template: CLIP's, as the card's evaluation
    pixels = processor(images=Image.open(tmp_path / "image.jpg").convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        texts = torch.nn.functional.normalize(clip.text_projection(clip.text_model(**tokens).pooler_output), dim=-1)

        def scores(encoder):
            embedded = clip.visual_projection(encoder(pixel_values=pixels).pooler_output)
            return (clip.logit_scale.exp() * torch.nn.functional.normalize(embedded, dim=-1) @ texts.T)[0].softmax(-1)

        merged, base = scores(tower), scores(clip.vision_model)
    for i, label in enumerate(labels):
        assert predictions[label] == pytest.approx(float(merged[i]), abs=1e-5)
    assert not torch.allclose(merged, base, atol=1e-4)  # else the snippet could leave the base's encoder in place

    plain = hfmerge.merge(list(TOWERS), method="average", progress=False)  # no CLIPModel base: a placeholder
    plain_card = (plain.save(tmp_path / "plain") / "README.md").read_text()
    assert 'clip = CLIPModel.from_pretrained("path/to/pre-trained-CLIPModel")' in usage_code(plain_card)


def test_dry_run_and_inspect_say_towers_have_no_labels(clip_hub, make_source, capsys):
    """The towers' configs hold transformers' default id2label (3 labels here): neither is shown as labels."""
    assert len(hfmerge.load(TOWERS[0]).config.id2label) == 3
    code, out, err = run_cli(["merge", *TOWERS, "--method", "ties", "--base", BASE, "--dry-run"], capsys)
    assert code == 0, err
    sources = [line for line in out.splitlines() if line.startswith("source ")]
    assert len(sources) == 2
    for line in sources:
        assert line.endswith("clip CLIPVisionModel, classes named at inference, through a text tower"), line
    code, out, err = run_cli(["merge", *TOWERS, "--method", "average", "--dry-run"], capsys)
    assert code == 0, err
    assert "averaged: " in out and "heads:" not in out  # a tower has no head to choose a policy for

    code, out, err = run_cli(["inspect", TOWERS[0]], capsys)
    assert code == 0, err
    assert out.splitlines()[-1] == ("labels: none; classes named at inference, through a text tower (a CLIPModel's, "
                                    "given to hfmerge evaluate as --base)")
    assert "class_0" not in out and "LABEL_0" not in out
    code, out, _ = run_cli(["inspect", BASE], capsys)
    assert out.splitlines()[-1] == "labels: none; classes named at inference, through a text tower (its own)"
    code, out, _ = run_cli(["inspect", str(make_source("vit", labels=["cat", "dog", "owl"]))], capsys)
    assert out.splitlines()[-4:] == ["labels (3):", "  0: cat", "  1: dog", "  2: owl"]  # a classifier's labels


def test_card_of_a_projection_tower_merge_uses_its_own_projection(clip_hub, tmp_path, monkeypatch):
    """A merged CLIPVisionModelWithProjection brings its merged projection into the base CLIPModel: the snippet's
    scores are the merged model's image embeddings against the base's text tower."""
    from huggingface_hub import snapshot_download

    folders = [save_tiny(tmp_path / f"p{seed}", "clip-projection",
                         model=tower_from(clip_hub, seed, "CLIPVisionModelWithProjection")) for seed in (1, 2)]
    result = hfmerge.merge([str(f) for f in folders], method="task_arithmetic", base=BASE, lambda_=1.0,
                           push_to_hub="org/clip-projection-card", progress=False)
    card = (result.save(tmp_path / "out") / "README.md").read_text()
    assert "clip.vision_model, clip.visual_projection = tower.vision_model, tower.visual_projection" in card
    predictions = {p["label"]: p["score"] for p in run_usage(card, tmp_path, monkeypatch)}

    labels = ["cat", "dog", "bird"]
    clip = transformers.CLIPModel.from_pretrained(snapshot_download(BASE)).eval()
    processor = transformers.CLIPProcessor.from_pretrained(snapshot_download(BASE))
    tower = transformers.CLIPVisionModelWithProjection.from_pretrained(tmp_path / "out").eval()
    assert not torch.allclose(tower.visual_projection.weight, clip.visual_projection.weight, atol=1e-4)
    tokens = processor.tokenizer([f"a photo of a {label}." for label in labels], padding=True,
                                 return_tensors="pt")  # the snippet's template
    pixels = processor(images=Image.open(tmp_path / "image.jpg").convert("RGB"), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        texts = torch.nn.functional.normalize(clip.text_projection(clip.text_model(**tokens).pooler_output), dim=-1)
        images = torch.nn.functional.normalize(tower(pixel_values=pixels).image_embeds, dim=-1)
        expected = (clip.logit_scale.exp() * images @ texts.T)[0].softmax(-1)
    for i, label in enumerate(labels):
        assert predictions[label] == pytest.approx(float(expected[i]), abs=1e-5)


def test_the_carried_sentence_says_whose_each_part_is():
    from hfmerge.publish.card import carried_text

    assert carried_text(None, base="org/base", anchor="org/a") is None
    assert carried_text({"part": "text tower", "base": 20, "anchor": 2}, base="org/base", anchor="org/a") == (
        "The text tower is not merged: 20 of its tensors are the base's (org/base), unchanged, and 2, which the "
        "base lacks or shapes otherwise, the anchor's (org/a).")
    lacking = {"part": "", "base": 5, "anchor": 0, "lacking": ["a", "b", "c", "d", "e"]}
    assert carried_text(lacking, base="org/base", anchor="org/a") == (
        "The part that no method merges (5 tensors) is not merged: it is the base's (org/base), unchanged; so are "
        "`a`, `b`, `c` and 2 more, which the sources lack.")
