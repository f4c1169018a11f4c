"""The package installs from a wheel: every module, the presets and the search spaces are in it,
and the CLIs find their presets in the installed package, not in a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[1]


def test_pyproject_lists_every_package_on_disk():
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "imram_dist").rglob("__init__.py")}
    assert set(declared) == on_disk | {"imram_dist.presets", "imram_dist.spaces"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The wheel built from this checkout, unpacked as pip installs a pure-Python wheel."""
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    (wheel,) = out.glob("imram_dist-*.whl")
    site = out / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    return site


def test_wheel_holds_the_modules_presets_and_spaces(installed):
    shipped = {p.relative_to(installed).as_posix() for p in installed.rglob("*") if p.suffix in (".py", ".yaml")}
    modules = {f"imram_dist/{p.relative_to(REPO / 'imram_dist').as_posix()}" for p in (REPO / "imram_dist").rglob("*.py")}
    presets = {f"imram_dist/presets/{p.name}" for p in (REPO / "configs").glob("*.yaml")}
    spaces = {f"imram_dist/spaces/{p.name}" for p in (REPO / "tune").glob("*.yaml")}
    assert {"imram_dist/presets/search.yaml", "imram_dist/spaces/default.yaml"} <= presets | spaces
    assert modules | presets | spaces <= shipped


def test_installed_cli_loads_presets_from_the_package(installed, tmp_path):
    code = ("import imram_dist, imram_dist.config as c, imram_dist.tune.space as s\n"
            "print(imram_dist.__file__); print(c.preset_path('search')); print(s.space_path('default'))\n"
            "print(c.load_config('f30k').model.embed_size)")
    # PYTHONPATH puts the installed copy ahead of the editable checkout; cwd is outside the checkout
    env = dict(os.environ, PYTHONPATH=str(installed))
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    module, preset, space, embed = proc.stdout.split()
    for path in (module, preset, space):
        assert Path(path).is_relative_to(installed), path
    assert Path(preset).name == "search.yaml" and Path(space).name == "default.yaml" and embed == "1024"
    # the real CLI, run from the installed copy, names its presets in --help
    proc = subprocess.run([sys.executable, "-m", "imram_dist.train", "--help"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "presets: ['coco', 'default', 'f30k', 'search']" in proc.stdout
