"""bench/train_digits.py as a user runs it: the command line, failing fast, the plot."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest

BENCH = pathlib.Path(__file__).resolve().parents[1] / "bench"

# Runs the demo with matplotlib made unimportable, whether or not it is installed.
_NO_MATPLOTLIB = """
import runpy, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("blocked by the test")
sys.meta_path.insert(0, Block())
sys.argv = ["train_digits.py"] + sys.argv[1:]
runpy.run_path({script!r}, run_name="__main__")
"""


def _run(args, code=None, timeout=120):
    cmd = [sys.executable] + (["-c", code] if code else [str(BENCH / "train_digits.py")]) + args
    env = dict(os.environ, PYTHONPATH=str(BENCH))
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_help_shows_defaults():
    out = _run(["--help"]).stdout
    assert "--epochs EPOCHS" in out and "(default: 12)" in out and "(default: 0.01)" in out


def test_plot_without_matplotlib_fails_before_training(tmp_path):
    png = tmp_path / "curves.png"
    proc = _run(["--plot", str(png), "--epochs", "50", "--quiet"],
                code=_NO_MATPLOTLIB.format(script=str(BENCH / "train_digits.py")), timeout=60)
    assert proc.returncode != 0
    assert "--plot needs matplotlib" in proc.stderr
    assert "epoch" not in proc.stdout  # no training ran
    assert not png.exists()


def test_plot_draws_both_runs_apart_and_the_times(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(BENCH))
    try:
        import train_digits as demo
    finally:
        sys.path.remove(str(BENCH))
    runs = [demo.Run("fastconv", [1.0, 0.5], [0.8, 0.9], [2.0, 0.1]),
            demo.Run("pytorch", [1.0, 0.5], [0.8, 0.9], [1.0, 0.2])]
    png = tmp_path / "curves.png"
    demo.plot(runs, str(png))
    assert png.stat().st_size > 10_000
    styles = demo._STYLES
    assert styles[0]["linestyle"] != styles[1]["linestyle"]
    assert styles[0]["marker"] != styles[1]["marker"]
