"""Packaging: every imported third-party package is declared, the version, the licence, `py.typed`."""

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

from selfflow.cli import main

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
OPTIONAL = {"simpler_env"}  # SIMPLER: installed by users from its repository (README), imported only by eval-simpler


def imported_top_level_modules() -> set[str]:
    names = set()
    for path in (REPO / "selfflow").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module.split(".")[0])
    return names - {"selfflow"} - set(sys.stdlib_module_names) - OPTIONAL


def declared_distributions() -> set[str]:
    return {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in PYPROJECT["project"]["dependencies"]}


def test_every_imported_package_is_declared():
    declared = declared_distributions()
    providers = packages_distributions()
    missing = {}
    for module in sorted(imported_top_level_modules()):
        dists = {d.lower() for d in providers.get(module, [])}
        assert dists, f"{module} is imported but no installed distribution provides it"
        if not dists & declared:
            missing[module] = sorted(dists)
    assert not missing, f"imported but not declared in pyproject.toml dependencies: {missing}"


def test_version_licence_and_typing_marker(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"selfflow {PYPROJECT['project']['version']}"
    licence = (REPO / "LICENSE").read_text().split()
    assert licence[:4] == ["Apache", "License", "Version", "2.0,"]
    assert " ".join(licence[-5:]) == "END OF TERMS AND CONDITIONS"
    assert PYPROJECT["project"]["license"] == "Apache-2.0"
    assert (REPO / "selfflow" / "py.typed").is_file() and "py.typed" in PYPROJECT["tool"]["setuptools"]["package-data"][
        "selfflow"
    ]
    assert (REPO / "CHANGELOG.md").read_text().count(f"## {PYPROJECT['project']['version']} ") == 1
