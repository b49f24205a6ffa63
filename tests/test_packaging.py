"""What `pip install fastpred` ships: the library only (train/ is run from a clone, like
torchvision's references/), py.typed, one version, the licence and citation files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import setuptools
import yaml

import fastpred

tomllib = pytest.importorskip("tomllib")  # Python 3.11+
ROOT = Path(__file__).resolve().parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _packages_on_disk(top: str) -> set[str]:
    """Every folder under ``top`` with an __init__.py, as a dotted name (walked independently of setuptools)."""
    found = set()
    for folder, _, files in os.walk(ROOT / top):
        if "__init__.py" in files and "__pycache__" not in folder:
            found.add(".".join(Path(folder).relative_to(ROOT).parts))
    return found


def test_wheel_ships_fastpred_and_not_the_trainer():
    """An installed top-level ``train`` shadowed every other project's train.py (issue 13)."""
    find = _pyproject()["tool"]["setuptools"]["packages"]["find"]
    shipped = set(setuptools.find_packages(where=str(ROOT), include=find.get("include", ["*"]),
                                           exclude=find.get("exclude", ())))
    assert not {p for p in shipped if p.split(".")[0] in ("train", "bench", "tests")}, shipped
    assert _packages_on_disk("fastpred") <= shipped  # every subpackage of the library is installed
    assert "train" in _packages_on_disk("train")  # (the check above is not vacuous: train/ is a package)


def test_py_typed_is_package_data():
    assert (ROOT / "fastpred" / "py.typed").is_file()
    assert "py.typed" in _pyproject()["tool"]["setuptools"]["package-data"]["fastpred"]


def test_version_is_written_once():
    project = _pyproject()["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert _pyproject()["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "fastpred.__version__"}
    assert re.fullmatch(r"\d+\.\d+\.\d+", fastpred.__version__)
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert "version" not in citation


def test_licence_and_citation_files():
    assert _pyproject()["project"]["license"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")
    paper = yaml.safe_load((ROOT / "CITATION.cff").read_text())["preferred-citation"]
    assert [a["family-names"] for a in paper["authors"]] == ["Tian", "Chen", "Ganguli"]
    assert paper["year"] == 2021 and paper["volume"] == 139 and "contrastive pairs" in paper["title"].lower()
    assert (ROOT / "CHANGELOG.md").is_file()


def test_extras_name_what_the_trainer_imports():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert {"torchvision", "pyyaml", "tqdm"} <= set(extras["train"])
    assert extras["tensorboard"] == ["tensorboard"]
    install = (ROOT / "README.md").read_text().split("## Install", 1)[1].split("\n## ", 1)[0]
    assert "[train]" in install and "tensorboard" in install


def test_dir_lists_each_name_once():
    fastpred.functional  # noqa: B018  (loads a lazy name, which then sits in globals() too)
    names = dir(fastpred)
    assert len(names) == len(set(names)) and "functional" in names and "DirectPredictor" in names


def test_make_figures_writes_where_the_readme_shows_them():
    recipe = (ROOT / "Makefile").read_text().split("\nfigures:", 1)[1].split("\n\n", 1)[0]
    out = re.search(r"--out (\S+)", recipe).group(1)
    shown = set(re.findall(r"!\[[^]]*\]\(([^)]+)/fig[^)]*\.png\)", (ROOT / "README.md").read_text()))
    assert shown == {out}


def test_readme_install_lines_install_the_build_requirements_first():
    """``--no-build-isolation`` ignores ``[build-system] requires``: a stock venv's setuptools 65.5 failed
    with "project.license must be valid exactly by one definition" (issue 20.13). The README's install
    block (run verbatim in a fresh venv by .ci/run) installs each build requirement before building."""
    text = (ROOT / "README.md").read_text()
    block = text.split("<!-- install:begin -->")[1].split("<!-- install:end -->")[0]
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    lines = [line for line in lines if line.startswith(("pip ", "python"))]
    build = next(i for i, line in enumerate(lines) if "--no-build-isolation" in line)
    before = " ".join(lines[:build])
    for req in _pyproject()["build-system"]["requires"]:
        name = re.split(r"[<>=]", req)[0]
        assert re.search(rf"(^|[\s']){re.escape(name)}([<>=\s']|$)", before), (req, lines[:build])
    assert "'setuptools>=77'" in before  # the version the licence metadata needs, not just any setuptools
    assert (ROOT / ".ci" / "run").read_text().count("install:begin") == 1  # CI runs exactly this block
