"""The model card says only what is true: each method's own text, no local paths, a reproduce command that runs."""

from __future__ import annotations

import re
import shlex

import pytest
import torch
import yaml
from helpers import run_cli
from safetensors.torch import load_file

import hfmerge
from hfmerge.methods import base as methods_base
from hfmerge.methods.average import Average
from hfmerge.methods.base import MergeMethod, ParamSpec, register_method
from hfmerge.recipe import Recipe
from hfmerge.testing.tiny import save_tiny


def card_of(sources, method, **kw):
    result = hfmerge.merge([str(s) for s in sources], method=method, progress=False, **kw)
    return result, (result.staging / "README.md").read_text()


def section(card: str, title: str) -> str:
    """The text of the card's ``## title`` section, up to the next section."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", card, re.S | re.M)
    assert match, f"no section {title!r} in the card"
    return match.group(1)


def sources_header(card: str) -> list[str]:
    header = next(line for line in section(card, "Sources").splitlines() if line.startswith("| model"))
    return [cell.strip() for cell in header.strip("|").split("|")]


def metadata(card: str) -> dict:
    return yaml.safe_load(card.split("---", 2)[1])


@pytest.fixture
def vits(make_source):
    return make_source("vit", seed=1), make_source("vit", seed=2)


def test_weight_column_only_for_methods_that_take_weights(vits, make_source):
    base = make_source("vit", seed=0)
    _, average = card_of(vits, "average", weights=[1, 3])
    assert sources_header(average) == ["model", "revision", "weight", "labels"]
    rows = [line for line in section(average, "Sources").splitlines() if line.startswith("| vit-")]
    assert [row.split("|")[3].strip() for row in rows] == ["0.25", "0.75"]  # 1/(1+3), 3/(1+3)
    _, layerwise = card_of(vits, "layerwise")
    assert sources_header(layerwise) == ["model", "revision", "labels", "role"]
    _, task_arithmetic = card_of(vits, "task_arithmetic", base=str(base))
    assert sources_header(task_arithmetic) == ["model", "revision", "labels"]


def test_usage_snippet_names_the_pushed_repo_or_a_placeholder(vits, tmp_path, capsys, local_hub):
    def usage(text):
        return section(text, "Usage")

    _, card = card_of(vits, "average")
    assert 'from_pretrained("path/to/merged-model")' in usage(card)
    recipe = Recipe(sources=[str(v) for v in vits], method="average", push_to_hub="org/vit-soup")
    staged = hfmerge.run_recipe(recipe, progress=False)
    assert 'from_pretrained("org/vit-soup")' in usage(staged.card.text)
    assert "hf download org/vit-soup hfmerge.yaml" in section(staged.card.text, "Reproduce")
    # the command line: the saved copy and the pushed copy name the same repo
    out = tmp_path / "merged"
    code, _, err = run_cli(["merge", *vits, "-m", "average", "-o", out, "--push-to-hub", "tester/card-soup", "-q"],
                           capsys)
    assert code == 0, err
    pushed = local_hub.repo("tester/card-soup")
    pushed_card = pushed.commits[pushed.branches["main"]]["README.md"].decode()
    for text in ((out / "README.md").read_text(), pushed_card):
        assert 'from_pretrained("tester/card-soup")' in usage(text)
        assert "path/to/merged-model" not in text


@pytest.mark.parametrize("method", ["average", "layerwise", "task_arithmetic", "fusion"])
def test_local_sources_leave_no_path_and_no_base_model_relation(make_source, tmp_path, monkeypatch, method):
    a, b = make_source("vit", seed=1), make_source("vit", 4 if method == "fusion" else 3, seed=2)
    base = make_source("vit", seed=0)
    monkeypatch.chdir(tmp_path)
    kw = {"base": f"./{base.name}"} if method == "task_arithmetic" else {}
    _, card = card_of([a, f"./{b.name}"], method, **kw)  # an absolute and a relative path
    assert str(tmp_path) not in card
    assert str(tmp_path.resolve()) not in card
    data = metadata(card)
    assert "base_model" not in data and "base_model_relation" not in data
    assert "pinned" not in card.lower()
    assert f"| {a.name} |" in section(card, "Sources") and f"| {b.name} |" in section(card, "Sources")
    assert f"- model: {a.name}\n- model: {b.name}\n" in section(card, "Reproduce")
    if method == "task_arithmetic":
        assert f"`{base.name}`" in card
    assert f"licenses differ or are unknown ({a.name}: unknown, {b.name}: unknown" in card  # folders, not paths


def test_trainer_checkpoints_are_named_with_their_run_folder(tmp_path):
    runs = [save_tiny(tmp_path / run / "checkpoint-500", "vit", seed=i) for i, run in enumerate(("run1", "run2"))]
    _, card = card_of(runs, "average")
    assert "| run1/checkpoint-500 |" in card and "| run2/checkpoint-500 |" in card
    assert str(tmp_path) not in card


def test_hub_and_local_sources_together(make_source, publish, tmp_path):
    sha = publish("org/card-vit-hub", family="vit", seed=7)
    local = make_source("vit", seed=8)
    _, card = card_of(["org/card-vit-hub", local], "average")
    data = metadata(card)
    assert data["base_model"] == ["org/card-vit-hub"] and data["base_model_relation"] == "merge"
    assert sources_header(card) == ["model", "revision", "commit", "weight", "labels"]
    assert sha in section(card, "Sources")
    assert "Hub models are pinned to the commits they resolved to." in card and str(tmp_path) not in card
    assert "hfmerge merge" not in card  # no command line that would need the folder's path


def _commands(card: str) -> list[list[str]]:
    """The shell lines of the card's Reproduce section that call hfmerge, as argument lists."""
    blocks = re.findall(r"```bash\n(.*?)```", section(card, "Reproduce"), re.S)
    lines = [line for block in blocks for line in block.splitlines() if line.startswith("hfmerge ")]
    assert lines, "no hfmerge command in the Reproduce section"
    return [shlex.split(line)[1:] for line in lines]


def _same_tensors(first, second):
    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_reproduce_command_from_a_saved_card_runs_and_gives_the_same_tensors(make_source, tmp_path, monkeypatch,
                                                                             capsys):
    a, b, c = (make_source("segformer", 3, seed=s) for s in (1, 2, 3))
    monkeypatch.chdir(tmp_path)  # the sources given as relative paths, the way a user types them
    sources = [f"./{p.name}" for p in (a, b, c)]
    code, _, err = run_cli(["merge", *sources, "-m", "layerwise", "--anchor", sources[1],
                            "--param", "start_layer=2", "-o", "saved", "-q"], capsys)
    assert code == 0, err
    saved = tmp_path / "saved"
    card = (saved / "README.md").read_text()
    assert str(tmp_path) not in card
    commands = _commands(card)
    assert commands == [["run", "hfmerge.yaml", "--output", "merged"]]
    monkeypatch.chdir(saved)
    for args in commands:
        code, _, err = run_cli([*args, "-q"], capsys)
        assert code == 0, err
    _same_tensors(saved, saved / "merged")
    # the reproduction kept the anchor: its head (not shared, 3 labels each but j = N_p) is the anchor's
    anchor = load_file(b / "model.safetensors")
    merged = load_file(saved / "merged" / "model.safetensors")
    head = [k for k in merged if k.startswith("decode_head.classifier")]
    assert head and all(torch.equal(merged[k], anchor[k]) for k in head)


def test_reproduce_commands_from_a_hub_card_run_and_give_the_same_tensors(publish, tmp_path, monkeypatch, capsys):
    publish("org/card-base", family="vit", seed=10)
    publish("org/card-task-a", family="vit", seed=11)
    publish("org/card-task-b", family="vit", seed=12)
    code, _, err = run_cli(["merge", "org/card-task-a", "org/card-task-b", "-m", "task_arithmetic",
                            "--base", "org/card-base", "--lambda", "0.123456789", "-o", tmp_path / "saved", "-q"],
                           capsys)
    assert code == 0, err
    saved = tmp_path / "saved"
    card = (saved / "README.md").read_text()
    commands = _commands(card)
    assert [args[0] for args in commands] == ["run", "merge"]
    assert "--param lambda=0.123456789" in shlex.join(commands[1])  # the exact λ, not a rounded one
    monkeypatch.chdir(saved)
    for i, args in enumerate(commands):
        args = [*args[:-1], f"merged-{i}"]  # the same command, into two folders
        code, _, err = run_cli([*args, "-q"], capsys)
        assert code == 0, err
        _same_tensors(saved, saved / f"merged-{i}")


def test_fusion_card_says_what_is_and_is_not_done(make_source, capsys):
    a, b = make_source("mask2former", 3, seed=1), make_source("mask2former", 2, seed=2)
    _, card = card_of([a, b], "fusion")
    method = section(card, "Method")
    assert "fine-tun" in method and "That step was not applied" in method and "`--data`" in method
    assert '"no object"' in method and "weighted average" in method
    assert "Parameter Fusion: Efficient Multi-Domain Classification" in method
    assert "](" not in method and "search" not in card  # the title without a link, never a search URL
    vits = make_source("vit", 3, seed=1), make_source("vit", 4, seed=2)
    _, vit_card = card_of(vits, "fusion")
    assert "no object" not in vit_card
    code, out, _ = run_cli(["methods"], capsys)
    fusion_reference = out.split("\nfusion:", 1)[1].splitlines()[1]
    assert code == 0 and "Parameter Fusion" in fusion_reference and "http" not in fusion_reference


def test_layerwise_card_gives_the_formula_with_start_layer(make_source):
    sources = [make_source("vit", seed=s) for s in (1, 2, 3)]
    _, card = card_of(sources, "layerwise", start_layer=4)
    method = section(card, "Method")
    assert "K = 4" in method and "M = 3" in method
    assert "H⁽ʲ⁾ = 1/M for j < K" in method and "(N_p − j) / ((N_p − K + 1) · M) for j ≥ K" in method
    rows = re.findall(r"^\| (\d+) \| `[^`]+` \| ([\d.]+) \| ([\d.]+) \|$", method, re.M)
    n_p, k, m = len(rows), 4, 3
    assert f"N_p = {n_p} " in method
    for j, anchor, other in rows:
        j = int(j)
        h = 1 / m if j < k else (n_p - j) / ((n_p - k + 1) * m)  # the formula the card states, by hand
        assert float(other) == pytest.approx(h, abs=5e-5) and float(anchor) == pytest.approx(1 - 2 * h, abs=5e-5)
    _, plain = card_of(sources, "layerwise")
    assert "H⁽ʲ⁾ = (N_p − j) / (N_p · M)" in section(plain, "Method") and "K =" not in plain


@pytest.fixture
def registry(monkeypatch):
    """A copy of the method registry for the test, so methods registered in it vanish afterwards."""
    monkeypatch.setattr(methods_base, "_REGISTRY", dict(methods_base._REGISTRY))


def test_a_new_method_renders_its_own_text_and_no_other(registry, vits):
    @register_method
    class Halfway(Average):
        name = "halfway_test"
        title = "Halfway test method"
        reference = "Nobody, A method made up for a test"
        reference_url = ""
        uses_weights = False
        parameters = (ParamSpec("depth", int, 2, "a made-up parameter"),)
        card_template = "Made-up text: depth {{ parameters.depth }} on {{ sources | length }} models."

    _, card = card_of(vits, "halfway_test", depth=5)
    method = section(card, "Method")
    # its own text and nothing else: no other method's formula, no link for an empty reference_url
    assert [line for line in method.splitlines() if line] == [
        "**Halfway test method** — Nobody, A method made up for a test.",
        "Made-up text: depth 5 on 2 models.",
    ]

    @register_method
    class Silent(Average):
        name = "silent_test"
        title = "A method without card text"
        reference = "Nobody, Another made-up method"
        reference_url = ""
        card_template = ""

    _, silent = card_of(vits, "silent_test")
    assert "hfmerge has no description of `silent_test`" in section(silent, "Method")
    assert "θ" not in section(silent, "Method") and "Σ" not in section(silent, "Method")


def test_card_template_has_no_method_branches():
    from importlib import resources

    template = resources.files("hfmerge.model_cards").joinpath("model_card.md.j2").read_text()
    assert "method.name ==" not in template and "method.name==" not in template


def test_a_typo_in_a_method_snippet_is_an_error_not_an_empty_value():
    class Typo(MergeMethod):
        name = "typo_test"
        card_template = "λ = {{ detials['lambda'] }}"

        def plan(self, ctx):  # pragma: no cover - never planned
            raise NotImplementedError

    import jinja2

    from hfmerge.publish.card import method_text

    with pytest.raises(jinja2.UndefinedError, match="detials"):
        method_text(Typo(), details={"lambda": 1.0}, parameters={}, base=None, sources=[])


def test_a_pushed_recipe_names_local_folders_without_the_machines_paths(vits, tmp_path, local_hub):
    out = tmp_path / "saved"
    hfmerge.merge([str(v) for v in vits], method="average", output=out, push_to_hub="org/local-paths-soup",
                  progress=False)
    repo = local_hub.repo("org/local-paths-soup")
    pushed = repo.commits[repo.branches["main"]]["hfmerge.yaml"].decode()
    assert str(tmp_path) not in pushed and str(tmp_path.resolve()) not in pushed
    assert [s["model"] for s in yaml.safe_load(pushed)["sources"]] == [v.name for v in vits]
    saved = yaml.safe_load((out / "hfmerge.yaml").read_text())  # the saved copy still reruns on this machine
    assert [s["model"] for s in saved["sources"]] == [str(v.resolve()) for v in vits]


def test_cards_state_what_becomes_of_heads_and_batchnorm_statistics(make_source):
    a = make_source("resnet", 3, seed=1, labels=["cat", "dog", "owl"])
    b = make_source("resnet", 2, seed=2, labels=["car", "bus"])
    base = make_source("resnet", 3, seed=0)
    _, concat = card_of([a, b], "average")
    method = section(concat, "Method")
    assert "outside the classifier heads is averaged" in method and "`concat` head policy" in method
    assert "5 labels" in method and "Every parameter is averaged" not in method
    _, anchored = card_of([a, b], "average", heads="anchor")
    assert "`anchor` head policy" in section(anchored, "Method")
    _, same = card_of([a, make_source("resnet", 3, seed=3, labels=["cat", "dog", "owl"])], "average")
    assert "Every parameter is averaged, classifier heads included" in section(same, "Method")
    _, task = card_of([a, b], "task_arithmetic", base=str(base))
    method = section(task, "Method")
    assert "BatchNorm running statistics are averaged" in method and "`concat` head policy" in method


@pytest.mark.parametrize("method", ["average", "task_arithmetic", "ties", "slerp"])
def test_cards_of_models_without_batchnorm_do_not_mention_it(method, make_source):
    """A ViT has LayerNorms only: its card says nothing of running statistics, and the heads sentence still reads."""
    a = make_source("vit", 3, seed=1, labels=["cat", "dog", "owl"])
    b = make_source("vit", 2, seed=2, labels=["car", "bus"])
    kw = {"base": str(make_source("vit", 3, seed=0))} if method in ("task_arithmetic", "ties") else {}
    _, card = card_of([a, b], method, **kw)
    text = section(card, "Method")
    assert "BatchNorm" not in text and "num_batches_tracked" not in text
    assert "`concat` head policy" in text and "  " not in text.strip() and ". ." not in text
    _, resnet = card_of([make_source("resnet", 3, seed=1), make_source("resnet", 3, seed=2)], method,
                        **({"base": str(make_source("resnet", 3, seed=0))} if kw else {}))
    assert "BatchNorm running statistics" in section(resnet, "Method")
