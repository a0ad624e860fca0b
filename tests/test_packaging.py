"""spherinator installs like its peers: a wheel that carries its presets and example experiments, dependency ranges
in pyproject.toml with this machine's exact versions in constraints.txt, and a LICENSE and CITATION.cff that agree
with the package metadata."""

from __future__ import annotations

import os
import site
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement

from spherinator import packaged
from spherinator.submit.resources import available_presets, load_preset
from spherinator.submit.sweep import SubmitError

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


# ------------------------------------------------------------------------------------------------ the wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from the checkout by its build backend, as ``pip install spherinator`` would get it."""
    out = tmp_path_factory.mktemp("wheel")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation", "-w", str(out),
         str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    (path,) = out.glob("spherinator-*.whl")
    return path


@pytest.mark.slow
def test_wheel_carries_presets_experiments_and_license_but_no_tests(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for preset in (ROOT / "slurm" / "presets").glob("*.yaml"):
        assert f"spherinator/_share/slurm/presets/{preset.name}" in names
    for experiment in (ROOT / "experiments").glob("*.yaml"):
        assert f"spherinator/_share/experiments/{experiment.name}" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    for template in (ROOT / "spherinator" / "atlas" / "templates").iterdir():  # the atlas's page templates
        assert f"spherinator/atlas/templates/{template.name}" in names
    assert not [n for n in names if n.startswith(("tests/", "tools/", "slurm/", "experiments/"))]


@pytest.mark.slow
def test_an_installed_wheel_finds_its_presets_and_experiments_outside_the_checkout(wheel, tmp_path):
    """Installed (not editable) into a target folder, with the dependencies of the current venv, run from a folder
    that is no checkout: ``--preset local`` and the example experiments are found inside the installed package."""
    target = tmp_path / "site"
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "--target", str(target), str(wheel)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    code = """
import json, sys
import spherinator
from spherinator import packaged
from spherinator.submit.resources import available_presets, load_preset
print(json.dumps({
    "package": spherinator.__file__,
    "presets": available_presets(),
    "local": load_preset("local"),
    "experiments": sorted(p.name for p in packaged.experiments_dir().glob("*.yaml")),
    "experiments_dir": str(packaged.experiments_dir()),
}))
"""
    # the target folder first, then the venv's site-packages for the dependencies (no network, no checkout)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", packaged.PRESET_PATH_ENV)}
    env["PYTHONPATH"] = os.pathsep.join([str(target), *site.getsitepackages()])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    import json

    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert Path(found["package"]).is_relative_to(target), found["package"]
    assert Path(found["experiments_dir"]).is_relative_to(target)
    assert {"local", "gpu_site_example"} <= set(found["presets"])
    assert found["local"] == load_preset("local")  # the same preset as in the checkout
    assert {"vae_cnn3.yaml", "demo.yaml"} <= set(found["experiments"])
    version = subprocess.run(
        [str(target / "bin" / "spherinator"), "--version"], env=env, cwd=cwd, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert version.returncode == 0 and version.stdout.split() == ["spherinator", PYPROJECT["version"]], version


# --------------------------------------------------------------------------------------------- the search path


def test_presets_are_looked_up_along_the_search_path_first_match_first(tmp_path, monkeypatch):
    site_dir, mine = tmp_path / "site", tmp_path / "mine"
    site_dir.mkdir()
    mine.mkdir()
    (site_dir / "local.yaml").write_text("partition: site-debug\n")
    (site_dir / "cluster.yaml").write_text("partition: gpu\ntime: 2:00:00\n")
    (mine / "cluster.yaml").write_text("partition: mine\n")
    monkeypatch.setenv(packaged.PRESET_PATH_ENV, os.pathsep.join([str(site_dir), str(mine)]))
    assert packaged.preset_dirs()[:2] == [site_dir, mine]
    assert load_preset("cluster") == {"partition": "gpu", "time": 120}  # the first folder wins
    assert load_preset("local") == {"partition": "site-debug"}  # a site's folder shadows a shipped preset
    assert load_preset("gpu_site_example")["gpus_per_node"] == 4  # the shipped ones are still found
    assert {"cluster", "local", "gpu_site_example"} <= set(available_presets())
    with pytest.raises(SubmitError, match=f"not found in {site_dir}.*available: cluster, gpu_site_example, local"):
        load_preset("nope")


def test_without_the_variable_the_shipped_presets_are_the_checkouts(monkeypatch):
    monkeypatch.delenv(packaged.PRESET_PATH_ENV, raising=False)
    assert packaged.preset_dirs() == [ROOT / "slurm" / "presets"]  # an editable install reads the checkout
    assert packaged.experiments_dir() == ROOT / "experiments"


def test_a_preset_file_that_is_not_there_is_named(tmp_path):
    with pytest.raises(SubmitError, match=r"preset file '.*missing\.yaml' not found"):
        load_preset(str(tmp_path / "missing.yaml"))


# ----------------------------------------------------------------------------------------- pins and ranges


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"constraints.txt: {line!r} is not an exact pin"
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_pyproject_declares_ranges_and_constraints_pin_versions_inside_them():
    pins = _pins()
    assert pins["torch"] == "2.14.1" and pins["torchvision"] == "0.29.1"
    requirements = [Requirement(r) for r in PYPROJECT["dependencies"]]
    requirements += [Requirement(r) for extra in PYPROJECT["optional-dependencies"].values() for r in extra]
    for req in requirements:
        assert not any(spec.operator in ("==", "===") for spec in req.specifier), f"pyproject pins {req} exactly"
        name = req.name.lower().replace("_", "-")
        assert name in pins, f"{req.name} is not pinned in constraints.txt (make constraints)"
        assert req.specifier.contains(pins[name], prereleases=True), f"constraints.txt {name}=={pins[name]} vs {req}"


def test_make_and_ci_install_with_the_constraints():
    makefile = (ROOT / "Makefile").read_text()
    installs = [line for line in makefile.splitlines() if "pip install" in line]
    assert installs and all("-c constraints.txt" in line for line in installs), installs
    assert "make venv" in (ROOT / ".ci" / "run").read_text()


# --------------------------------------------------------------------------------------- license, citation


def test_license_file_is_the_apache_license_pyproject_names():
    assert PYPROJECT["license"] == "Apache-2.0" and PYPROJECT["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    assert "END OF TERMS AND CONDITIONS" in text and "APPENDIX: How to apply the Apache License" in text


def test_citation_file_is_cff_1_2_and_agrees_with_the_package():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0"
    assert {"message", "title", "authors"} <= set(cff)  # required by the CFF 1.2.0 schema
    assert all(isinstance(a, dict) and ("name" in a or "family-names" in a) for a in cff["authors"])
    assert cff["title"] == PYPROJECT["name"]
    assert cff["version"] == PYPROJECT["version"]
    assert cff["license"] == PYPROJECT["license"]


# ------------------------------------------------------------------------------------------- the module graph


def spherinator_imports() -> dict[str, set[str]]:
    """Each spherinator module and the spherinator modules it imports anywhere in it (also inside functions)."""
    import ast

    package = ROOT / "spherinator"
    modules = {}
    for path in package.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        base = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                parts = base.split(".")[: len(base.split(".")) - node.level + 1] if node.level else []
                module = ".".join([*parts, node.module] if node.module else parts)
                targets |= {module, *(f"{module}.{alias.name}" for alias in node.names)}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def test_no_import_cycle_among_spherinator_modules():
    graph = spherinator_imports()
    assert {"spherinator.cli", "spherinator.commands", "spherinator.errors"} <= set(graph)
    cycles = []
    for start in graph:  # a module that reaches itself again
        seen, stack = set(), list(graph[start])
        while stack:
            module = stack.pop()
            if module == start:
                cycles.append(start)
                break
            if module not in seen:
                seen.add(module)
                stack += graph[module]
    assert cycles == [], f"these modules import themselves through others: {sorted(cycles)}"
