"""Methods and families from other packages, through the entry-point groups ``hfmerge.methods``, ``hfmerge.families``.

Each plug-in package is written into the test's own folder beside a ``*.dist-info`` folder (``METADATA``,
``entry_points.txt``), as pip would install it, and that folder goes on the ``PYTHONPATH`` of a subprocess:
hfmerge finds it through ``importlib.metadata`` and nothing is installed into the environment.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import hfmerge
import hfmerge.errors

# A method of the plug-in's own: hfmerge's average under a name of its own. It imports no torch (as hfmerge's
# methods do, it would import it inside ``plan``), so listing the methods stays light.
SOUP_METHODS = '''
"""hfmerge's average as a method of this package's own."""
import hfmerge

Average = type(hfmerge.get_method("average"))


class PluginSoup(Average):
    name = "plugin_soup"
    title = "Uniform parameter average, from a plug-in"
    reference = "hfmerge-plugin-soup, a test plug-in"
    reference_url = ""
'''

# A family hfmerge does not support itself: transformers' RegNet image classifiers.
SOUP_FAMILIES = '''
"""RegNet image classifiers for hfmerge."""
from hfmerge import FamilyAdapter, HeadSpec

REGNET = FamilyAdapter(
    name="regnet",
    model_types=("regnet",),
    architectures={"RegNetForImageClassification": "image-classification",
                   "RegNetModel": "image-feature-extraction"},
    heads={"RegNetForImageClassification": (HeadSpec(r"classifier\\.1\\.(weight|bias)"),)},
    default_architecture="RegNetForImageClassification",
    backbone_prefix="regnet",
)
'''

SOUP_ENTRY_POINTS = """
[hfmerge.methods]
plugin_soup = hfmerge_plugin_soup.methods:PluginSoup

[hfmerge.families]
regnet = hfmerge_plugin_soup.families:REGNET
"""

BROKEN_METHODS = '''
import hfmerge

NOT_A_METHOD = "average"


class SameName(type(hfmerge.get_method("average"))):  # a subclass that forgot to name itself
    title = "Average again"
'''

BROKEN_ENTRY_POINTS = """
[hfmerge.methods]
missing = hfmerge_plugin_missing:Method
not_a_method = hfmerge_plugin_broken.methods:NOT_A_METHOD
same_name = hfmerge_plugin_broken.methods:SameName

[hfmerge.families]
failing = hfmerge_plugin_broken.families:ADAPTER
"""


def install(site: Path, distribution: str, files: dict[str, str], entry_points: str) -> Path:
    """Write a package's files into ``site`` with its ``*.dist-info``, as an installed distribution."""
    for relative, text in files.items():
        path = site / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    info = site / f"{distribution.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points.lstrip())
    return site


def hfmerge_env(site: Path, home: Path) -> dict[str, str]:
    """The environment of a subprocess that sees ``site``'s plug-ins and this checkout's hfmerge."""
    checkout = Path(hfmerge.__file__).resolve().parents[1]
    path = [str(site), str(checkout), *filter(None, [os.environ.get("PYTHONPATH")])]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1", "HF_HOME": str(home),
            "HF_HUB_DISABLE_TELEMETRY": "1"}


def run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


@pytest.fixture(scope="module")
def soup(tmp_path_factory):
    """The installed plug-in (``site``) and the environment that sees it."""
    root = tmp_path_factory.mktemp("plugin-soup")
    site = install(root / "site", "hfmerge-plugin-soup",
                   {"hfmerge_plugin_soup/__init__.py": "", "hfmerge_plugin_soup/methods.py": SOUP_METHODS,
                    "hfmerge_plugin_soup/families.py": SOUP_FAMILIES}, SOUP_ENTRY_POINTS)
    return {"root": root, "env": hfmerge_env(site, root / "hf_home")}


def save_regnet(folder: Path, seed: int) -> Path:
    """A tiny RegNet image classifier (2 stages, widths 8 and 16) with its image processor."""
    import transformers

    from hfmerge.testing.tiny import image_processor

    config = transformers.RegNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                       groups_width=8, layer_type="x", id2label={0: "a", 1: "b", 2: "c"},
                                       label2id={"a": 0, "b": 1, "c": 2})
    config.architectures = ["RegNetForImageClassification"]
    torch.manual_seed(seed)
    transformers.RegNetForImageClassification(config).save_pretrained(folder)
    image_processor("resnet", 32).save_pretrained(folder)
    return folder


def test_the_plugin_is_not_part_of_hfmerge_itself():
    """What the subprocesses below merge with comes from the plug-in: this process has neither."""
    from hfmerge.adapters import family_for_model_type

    assert "plugin_soup" not in hfmerge.available_methods()
    assert family_for_model_type("regnet") is None


def test_hfmerge_methods_and_help_list_the_plugin_method_without_loading_torch(soup):
    done = run(["-m", "hfmerge", "methods"], soup["env"], soup["root"])
    assert done.returncode == 0, done.stderr
    assert "plugin_soup: Uniform parameter average, from a plug-in" in done.stdout
    assert "    plug-in: hfmerge-plugin-soup 0.1" in done.stdout
    assert "average: " in done.stdout and "warning" not in done.stderr
    probe = ("import contextlib, io, sys\n"
             "from hfmerge.cli import main\n"
             "out = io.StringIO()\n"
             "with contextlib.redirect_stdout(out):\n"
             "    try:\n"
             "        main(['merge', '--help'])\n"
             "    except SystemExit:\n"
             "        pass\n"
             "print(out.getvalue())\n"
             "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers'}))\n")
    done = run(["-c", probe], soup["env"], soup["root"])
    assert done.returncode == 0, done.stderr
    assert "plugin_soup" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "[]"  # the plug-in loaded, torch and transformers did not


def test_a_plugin_method_merges_models_of_a_plugin_family_through_the_cli(soup, tmp_path):
    a, b = save_regnet(tmp_path / "regnet-a", seed=1), save_regnet(tmp_path / "regnet-b", seed=2)
    out = tmp_path / "merged"
    done = run(["-m", "hfmerge", "merge", str(a), str(b), "--method", "plugin_soup", "--output", str(out), "-q"],
               soup["env"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"saved: {out}"

    merged, first, second = (load_file(str(folder / "model.safetensors")) for folder in (out, a, b))
    assert set(merged) == set(first) == set(second)
    for name, tensor in merged.items():  # what the method computes: the mean of the two sources' weights
        if not tensor.is_floating_point():  # BatchNorm's step count
            continue
        torch.testing.assert_close(tensor, (first[name] + second[name]) / 2, rtol=0, atol=1e-6, msg=name)
    assert not torch.equal(first["classifier.1.weight"], second["classifier.1.weight"])

    recipe = yaml.safe_load((out / "hfmerge.yaml").read_text())
    assert recipe["method"] == "plugin_soup"
    card = (out / "README.md").read_text()
    assert "- plugin_soup" in card and "θ = Σᵢ wᵢ θᵢ" in card  # its tag, and the card text it inherits
    assert json.loads((out / "config.json").read_text())["model_type"] == "regnet"

    import transformers

    model = transformers.RegNetForImageClassification.from_pretrained(out)  # plain transformers loads it
    assert model.config.id2label == {0: "a", 1: "b", 2: "c"}


def test_broken_entry_points_warn_once_each_and_hfmerge_keeps_working(tmp_path, make_source):
    site = install(tmp_path / "site", "hfmerge-plugin-broken",
                   {"hfmerge_plugin_broken/__init__.py": "", "hfmerge_plugin_broken/methods.py": BROKEN_METHODS,
                    "hfmerge_plugin_broken/families.py": "raise RuntimeError('this family is broken')\n"},
                   BROKEN_ENTRY_POINTS)
    env = hfmerge_env(site, tmp_path / "hf_home")

    done = run(["-m", "hfmerge", "methods"], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "average: " in done.stdout and "Traceback" not in done.stderr
    warnings = done.stderr.strip().splitlines()
    assert len(warnings) == 3, done.stderr  # one per broken method entry point, however often the registry is asked
    assert all(line.startswith("hfmerge: warning: plug-in '") for line in warnings)
    assert all("(entry point of group hfmerge.methods, from hfmerge-plugin-broken 0.1)" in line for line in warnings)
    missing, not_a_method, same_name = warnings  # in entry-point name order
    assert "'missing = hfmerge_plugin_missing:Method'" in missing and "ModuleNotFoundError" in missing
    assert "'not_a_method = " in not_a_method and "not a MergeMethod subclass" in not_a_method
    assert "'same_name = " in same_name and "already registered" in same_name
    assert "SameName subclasses it, so give it a name of its own" in same_name
    assert "failing" not in done.stderr  # the families are loaded when they are first asked for, not before

    vit = make_source("vit")
    done = run(["-m", "hfmerge", "inspect", str(vit)], env, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "family: vit" in done.stdout
    assert "Traceback" not in done.stderr
    assert len([line for line in done.stderr.splitlines() if "hfmerge.methods" in line]) == 3  # the CLI's, as above
    family_warnings = [line for line in done.stderr.splitlines() if "hfmerge.families" in line]
    assert len(family_warnings) == 1
    assert "'failing = hfmerge_plugin_broken.families:ADAPTER'" in family_warnings[0]
    assert "RuntimeError: this family is broken" in family_warnings[0]


def test_every_error_class_is_a_public_name():
    errors = {name for name, value in vars(hfmerge.errors).items()
              if isinstance(value, type) and issubclass(value, hfmerge.errors.HfMergeError)}
    assert {"DataError", "EvaluationError", "StatisticsError", "TrainingError"} <= errors
    for name in errors:
        assert name in hfmerge.__all__ and getattr(hfmerge, name) is getattr(hfmerge.errors, name)
    assert sorted(hfmerge.__all__) == sorted(errors | set(hfmerge._LAZY))  # and nothing else, nothing missing


def test_the_plugin_api_is_public():
    from hfmerge.methods import base, stages

    assert isinstance(hfmerge.get_method("average"), hfmerge.MergeMethod)
    assert hfmerge.register_method is base.register_method and hfmerge.available_methods is base.available_methods
    for name in ("Stage", "Statistics", "FineTune", "FineTuning", "Derive", "Analyse", "Compare", "DataNeed", "Phase"):
        assert getattr(hfmerge, name) is getattr(stages, name) and name in hfmerge.__all__
    for name in ("FamilyAdapter", "HeadSpec", "register_family", "MergePlan", "MergeContext"):
        assert name in hfmerge.__all__ and getattr(hfmerge, name) is not None
