"""fastpred.theory stays NumPy-only: no torch, no matplotlib at import."""

import subprocess
import sys
from pathlib import Path

import fastpred.theory

PKG = Path(fastpred.theory.__file__).resolve().parent.parent


def test_theory_imports_without_torch_or_matplotlib():
    # Stub the parent package so that only fastpred.theory's own imports are measured
    # (fastpred/__init__.py itself belongs to the torch side of the project).
    code = f"""
import sys, types
pkg = types.ModuleType("fastpred"); pkg.__path__ = [{str(PKG)!r}]
sys.modules["fastpred"] = pkg
import fastpred.theory as th
assert th.fixed_points(1.0, 0.01, 0.0) is not None
heavy = sorted(m for m in ("torch", "matplotlib", "scipy") if m in sys.modules)
print(",".join(heavy))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
