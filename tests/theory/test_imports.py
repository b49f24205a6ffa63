"""fastpred.theory stays NumPy-only: no torch, no matplotlib, no scipy at import."""

import subprocess
import sys


def test_theory_imports_without_torch_or_matplotlib():
    code = """
import sys
import fastpred.theory as th
assert th.fixed_points(1.0, 0.01, 0.0) is not None
heavy = sorted(m for m in ("torch", "matplotlib", "scipy") if m in sys.modules)
print(",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
