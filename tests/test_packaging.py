"""The wheel holds every package of the source tree: pyproject.toml lists them by hand."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_folder_of_the_package_is_listed_in_pyproject():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    mapped = {name: ROOT / folder for name, folder in setuptools["package-dir"].items()}
    found = {".".join(init.parent.relative_to(ROOT).parts) for init in (ROOT / "hfmerge").rglob("__init__.py")}
    for name, folder in mapped.items():  # model_cards/ and spaces/ are packaged under hfmerge
        found |= {".".join((name, *init.parent.relative_to(folder).parts)) for init in folder.rglob("__init__.py")}
    assert found - listed == set(), "add these packages to [tool.setuptools] packages in pyproject.toml"

    def folder(name: str) -> Path:  # a listed package's folder (a data folder such as spaces/examples too)
        base = next((k for k in mapped if name == k or name.startswith(k + ".")), None)
        if base is None:
            return ROOT.joinpath(*name.split("."))
        return mapped[base].joinpath(*name[len(base):].split(".")[1:])

    assert [name for name in listed if not folder(name).is_dir()] == []


def test_the_eval_extra_installs_the_evaluate_package_that_metric_names_need():
    # `hfmerge evaluate --metric accuracy` says "pip install 'hfmerge[eval]'" when evaluate is missing
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = [re.match(r"[A-Za-z0-9_.-]+", requirement).group() for requirement in extras.get("eval", [])]
    assert "evaluate" in names
