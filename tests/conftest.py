"""Hermetic test environment: no network, a private HF_HOME, and a local Hub on loopback.

huggingface_hub reads HF_ENDPOINT when it is imported, so the port is chosen
and the environment set here, before any test module imports it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

_SESSION_HOME = tempfile.mkdtemp(prefix="hfmerge-tests-")

import socket  # noqa: E402

with socket.socket() as _sock:  # not hfmerge.testing.ports: importing hfmerge would load huggingface_hub now
    _sock.bind(("127.0.0.1", 0))
    _PORT = _sock.getsockname()[1]
_TOKEN = "hf_local_test_token"
os.environ.update(
    HF_HOME=os.path.join(_SESSION_HOME, "hf_home"),
    HF_ENDPOINT=f"http://127.0.0.1:{_PORT}",
    HF_TOKEN=_TOKEN,
    HF_HUB_DISABLE_TELEMETRY="1",
    HF_HUB_DISABLE_PROGRESS_BARS="1",
    HF_HUB_DISABLE_IMPLICIT_TOKEN="0",
    GRADIO_ANALYTICS_ENABLED="False",
    TRANSFORMERS_VERBOSITY="error",
    TOKENIZERS_PARALLELISM="false",
)
os.environ.pop("HF_HUB_OFFLINE", None)

import pytest  # noqa: E402

from hfmerge.testing.local_hub import LocalHub  # noqa: E402
from hfmerge.testing.tiny import save_tiny, tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def local_hub():
    """The local Hub-compatible server that HF_ENDPOINT points at."""
    with LocalHub(token=_TOKEN, port=_PORT) as hub:
        yield hub


@pytest.fixture(scope="session")
def hub_api(local_hub):
    from huggingface_hub import HfApi

    return HfApi(endpoint=local_hub.endpoint, token=local_hub.token)


@pytest.fixture(scope="session")
def publish(hub_api, tmp_path_factory):
    """Push a model (or a folder) to the local Hub; returns the commit sha."""

    def _publish(repo_id: str, folder: Path | None = None, *, model=None, family: str | None = None,
                 private: bool = False, readme: str | None = None, **tiny) -> str:
        if folder is None:
            folder = tmp_path_factory.mktemp("src")
            save_tiny(folder, family, model=model, **tiny)
        if readme is not None:
            (folder / "README.md").write_text(readme)
        hub_api.create_repo(repo_id, private=private, exist_ok=True)
        return hub_api.upload_folder(folder_path=str(folder), repo_id=repo_id).oid

    return _publish


@pytest.fixture
def unreachable_hub(monkeypatch):
    """HF_ENDPOINT on a loopback port where nothing listens: every connection is refused."""
    from huggingface_hub import constants

    from hfmerge.testing.ports import free_port

    endpoint = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    return endpoint


@pytest.fixture
def make_source(tmp_path):
    """Save a tiny model to a local folder and return the folder."""
    counter = {"n": 0}

    def _make(family: str, num_labels: int = 3, *, seed: int = 0, model=None, labels=None) -> Path:
        counter["n"] += 1
        folder = tmp_path / f"{family}-{counter['n']}"
        return save_tiny(folder, family, num_labels, seed=seed, model=model, labels=labels)

    return _make


@pytest.fixture
def tiny():
    return tiny_model


@pytest.fixture(scope="session")
def digit_hub(hub_api, tmp_path_factory):
    """The digit tasks as dataset repos ``org/<task>`` and the digit ViTs as ``org/vit-digits-<name>`` on the local Hub.

    With them, a tiny pre-trained MobileNetV2 classifier as ``org/tiny-mobilenet-gate``: the gating merge's ``gate``.
    Returns ``{"datasets": {task: repo id}, "models": {name: repo id}, "folders": {name: local folder},
    "gate": repo id, "gate_folder": local folder}``.
    """
    from hfmerge.testing.digit_models import GATING_MODELS, train_digit_models
    from hfmerge.testing.tasks import push_digit_datasets
    from hfmerge.testing.tiny_gate import GATE_REPO_NAME, save_tiny_gate

    datasets = push_digit_datasets(hub_api, "org")
    folders = train_digit_models(tmp_path_factory.mktemp("digit-models"), models=GATING_MODELS)
    models = {}
    for name, folder in folders.items():
        repo_id = f"org/vit-digits-{name}"
        hub_api.create_repo(repo_id, exist_ok=True)
        hub_api.upload_folder(folder_path=str(folder), repo_id=repo_id)
        models[name] = repo_id
    gate_folder = save_tiny_gate(tmp_path_factory.mktemp("gate") / GATE_REPO_NAME)
    gate = f"org/{GATE_REPO_NAME}"
    hub_api.create_repo(gate, exist_ok=True)
    hub_api.upload_folder(folder_path=str(gate_folder), repo_id=gate)
    return {"datasets": datasets, "models": models, "folders": folders, "gate": gate, "gate_folder": gate_folder}


@pytest.fixture(scope="session")
def digit_resnets(digit_hub, hub_api, tmp_path_factory):
    """Tiny ResNets trained on the digits task from different seeds (and ``wide``, other widths), on the local Hub.

    Returns ``{"models": {name: repo id}, "folders": {name: local folder}, "dataset": the digits dataset repo id}``
    with names ``seed0``, ``seed1`` and ``wide``; the repos are ``org/resnet-digits-<name>``.
    """
    from hfmerge.testing.digit_resnets import train_digit_resnets

    folders = train_digit_resnets(tmp_path_factory.mktemp("digit-resnets"), ("seed0", "seed1", "wide"))
    models = {}
    for name, folder in folders.items():
        repo_id = f"org/resnet-digits-{name}"
        hub_api.create_repo(repo_id, exist_ok=True)
        hub_api.upload_folder(folder_path=str(folder), repo_id=repo_id)
        models[name] = repo_id
    return {"models": models, "folders": folders, "dataset": digit_hub["datasets"]["digits"]}
