"""``import fastconv.torch`` where PyTorch is not installed says what to install (simulated in a
subprocess whose import system refuses ``torch``); ``import fastconv`` needs no PyTorch."""
from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import sys

    class NoTorch:
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, NoTorch())
    import numpy as np
    import fastconv
    assert "torch" not in sys.modules
    assert fastconv.conv2d(np.ones((1, 1, 3, 3)), np.ones((1, 1, 3, 3))).item() == 9.0
    try:
        import fastconv.torch
    except ImportError as exc:
        print(type(exc).__name__, exc)
    else:
        print("imported")
""")


def test_import_without_torch_says_what_to_install():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout.strip()
    assert out.startswith("ImportError fastconv.torch needs PyTorch"), out
    assert "pip install torch" in out and "fastconv[torch]" in out, out
