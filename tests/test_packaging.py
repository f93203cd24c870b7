"""Packaging and documentation: one version, typed, licensed; the docstring examples run."""
from __future__ import annotations

import doctest
import importlib.metadata
import pathlib

import pytest

import fastconv
import fastconv.conv
import fastconv.hinge

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_version_is_written_once():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert "version" not in project and "version" in project["dynamic"]
    assert importlib.metadata.version("fastconv") == fastconv.__version__


def test_typed_and_licensed():
    assert (pathlib.Path(fastconv.__file__).parent / "py.typed").exists()
    assert "MIT License" in (ROOT / "LICENSE").read_text()
    assert 'license = "MIT"' in (ROOT / "pyproject.toml").read_text()


@pytest.mark.parametrize("module", [fastconv.conv, fastconv.hinge], ids=lambda m: m.__name__)
def test_docstring_examples(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_help_names_every_option():
    doc = fastconv.conv2d.__doc__
    for word in ("stride :", "padding :", "dilation :", "groups :", "Examples", '"same"'):
        assert word in doc


def test_environment_variables_documented():
    readme = (ROOT / "README.md").read_text()
    for var in ("FASTCONV_BACKEND", "FASTCONV_PRECISION", "FASTCONV_WORKSPACE_MB",
                "NUMBA_CACHE_DIR", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER"):
        assert f"| `{var}`" in readme, var
