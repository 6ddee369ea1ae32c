"""The Space's Gradio-free half (spaces/inference.py): without Gradio, without hfmerge, without the Hub;
its table of heads against hfmerge's adapters; a corrupt hfmerge.yaml said aloud."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import run_cli
from hfmerge.spaces import inference
from huggingface_hub import constants as hf_constants
from huggingface_hub import snapshot_download

from hfmerge import source_ref
from hfmerge.adapters.base import _FAMILIES
from hfmerge.testing.tiny import save_tiny

SPACES = Path(inference.__file__).resolve().parent
MISSING_SHA = "f" * 40


def test_the_space_table_of_heads_agrees_with_the_adapters():
    shown = {"image-classification": "classification", "image-segmentation": "segmentation",
             "zero-shot-image-classification": "zero-shot"}
    checked = 0
    for adapter in {a.name: a for a in _FAMILIES.values()}.values():
        for architecture, task in adapter.architectures.items():
            # a CLIP image encoder is shown zero-shot with the merged CLIPModel's text tower
            expected = shown.get(task) or ("zero-shot" if adapter.zero_shot else None)
            assert inference.head_kind(architecture) == expected, (adapter.name, architecture, task)
            checked += 1
    assert checked >= 10


def test_a_gated_merge_is_told_by_its_model_type_whatever_method_made_it(tmp_path):
    """A plug-in's variant of gating names itself otherwise: the Space asks the model's config, not hfmerge.yaml."""
    from hfmerge.methods.gating.model import MODEL_TYPE

    assert inference.GATED_MODEL_TYPE == MODEL_TYPE
    folder = tmp_path / "merged"
    folder.mkdir()
    (folder / "hfmerge.yaml").write_text("method: my_gating\nsources: [org/a, org/b]\n")
    (folder / "config.json").write_text(json.dumps({"model_type": MODEL_TYPE}))
    assert inference.is_gated(str(folder))
    (folder / "config.json").write_text(json.dumps({"model_type": "vit"}))
    assert not inference.is_gated(str(folder))
    (folder / "config.json").write_text("not json")
    assert not inference.is_gated(str(folder)) and not inference.is_gated(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def cached_source(publish):
    """A source on the local Hub, downloaded into this session's cache; its pinned reference."""
    sha = publish("org/offline-src", family="vit", seed=5)
    snapshot_download("org/offline-src", revision=sha)
    return f"org/offline-src@{sha}"


def merged_folder(root: Path, recipe: str) -> Path:
    folder = save_tiny(root / "merged", "vit", seed=6)
    (folder / "hfmerge.yaml").write_text(recipe)
    return folder


def recipe_of(*refs: str) -> str:
    sources = [{"model": r.split("@")[0], "commit": r.split("@")[1]} for r in refs]
    return json.dumps({"method": "average", "sources": sources})


@pytest.fixture
def dead_endpoint():
    """The URL of a port where nothing listens: connections are refused, as for a Hub that cannot be reached."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# Runs inference.py as a Space runs it, with neither Gradio nor hfmerge importable, and counts the
# connections it tries to open to the Hub's port.
_WITHOUT_GRADIO = """
import json, socket, sys, urllib.parse, PIL.Image
sys.modules["gradio"] = None
sys.modules["hfmerge"] = None
port, attempts = urllib.parse.urlsplit(sys.argv[3]).port, []
connect = socket.socket.connect
def counting_connect(self, address):
    if isinstance(address, tuple) and address[1] == port:
        attempts.append(address)
    return connect(self, address)
socket.socket.connect = counting_connect
sys.path.insert(0, sys.argv[1])
import inference
demo = inference.load_demo(sys.argv[2])
payload, _ = demo.predict(PIL.Image.new("RGB", (20, 20), "red"))
print(json.dumps({"payload": payload, "attempts": len(attempts), "gradio": sys.modules["gradio"] is not None}))
"""


def test_without_gradio_or_hfmerge_and_with_an_unreachable_hub_the_app_loads_at_once(
        tmp_path, cached_source, dead_endpoint):
    folder = merged_folder(tmp_path, recipe_of(cached_source, f"org/offline-missing@{MISSING_SHA}"))
    app = tmp_path / "app"  # the app's files as a written Space has them: inference.py and the core's source_ref.py
    app.mkdir()
    shutil.copyfile(SPACES / "inference.py", app / "inference.py")
    shutil.copyfile(source_ref.__file__, app / "source_ref.py")
    env = {**os.environ, "HF_ENDPOINT": dead_endpoint, "PYTHONPATH": ""}
    done = subprocess.run([sys.executable, "-c", _WITHOUT_GRADIO, str(app), str(folder), dead_endpoint],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["gradio"] is False
    payload = answer["payload"]
    # the cached source still shows; the other is a note in the API's answer, after the reason
    assert list(payload["sources"]) == [f"org/offline-src@{cached_source.split('@')[1][:7]}"]
    notes = payload["notes"]
    assert len(notes) == 2
    assert notes[0].startswith("Models on the Hub were loaded from the local cache only: "
                               f"the Hub at {dead_endpoint} cannot be reached")
    assert notes[1].startswith(f"Source not shown: org/offline-missing@{MISSING_SHA[:7]} could not be loaded from "
                               "the local cache")
    # One probe (and at most one more: huggingface_hub may fetch its agent registry once), where the
    # client's retries used to try each file of each source six times.
    assert 1 <= answer["attempts"] <= 2


def test_hf_hub_offline_makes_no_request_and_says_so(tmp_path, cached_source, local_hub, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    folder = merged_folder(tmp_path, recipe_of(cached_source, f"org/offline-missing@{MISSING_SHA}"))
    before = len(local_hub.requests)
    demo = inference.load_demo(str(folder))
    assert len(local_hub.requests) == before
    assert [m.name for m in demo.sources] == [f"org/offline-src@{cached_source.split('@')[1][:7]}"]
    assert demo.notes[0] == "Models on the Hub were loaded from the local cache only: HF_HUB_OFFLINE is set."
    assert "org/offline-missing" in demo.notes[1]


def test_the_hub_probe(local_hub, dead_endpoint, monkeypatch):
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    assert inference.hub_unreachable(local_hub.endpoint) is None  # any HTTP answer, even a 404, is an answer
    reason = inference.hub_unreachable(dead_endpoint, timeout=2)
    assert reason.startswith(f"the Hub at {dead_endpoint} cannot be reached")


CORRUPT = "method: average\nsources:\n  - model: org/a\n   commit: abc\n"


def test_a_corrupt_recipe_is_a_note_in_the_app(tmp_path):
    folder = merged_folder(tmp_path, CORRUPT)
    demo = inference.load_demo(str(folder))
    assert demo.sources == [] and demo.metadata is None
    assert len(demo.notes) == 1
    assert demo.notes[0] == ("merged/hfmerge.yaml is not valid YAML: expected <block end>, but found "
                             "'<block mapping start>' at line 4, column 4, so the model is shown alone.")


def test_hfmerge_space_warns_of_a_corrupt_recipe_and_shows_the_model_alone(tmp_path, capsys):
    folder = merged_folder(tmp_path, CORRUPT)
    code, stdout, err = run_cli(["space", folder, "--output", tmp_path / "space"], capsys)
    assert code == 0 and stdout.strip() == f"written: {tmp_path / 'space'}"
    assert err.splitlines() == [
        f"hfmerge: warning: {folder}/hfmerge.yaml is not valid YAML: expected <block end>, but found "
        "'<block mapping start>' at line 4, column 4; the Space shows the model alone (pass --sources to show "
        "models beside it)"]
    assert json.loads((tmp_path / "space" / "space_config.json").read_text())["sources"] == []

    (folder / "hfmerge.yaml").write_text("- just\n- a list\n")
    code, _, err = run_cli(["space", folder, "--output", tmp_path / "space2"], capsys)
    assert code == 0 and "hfmerge.yaml is not a recipe (a YAML mapping" in err
