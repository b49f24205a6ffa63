"""examples/ run a few steps on the CPU, and the README's Quick start runs as pasted."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "script, needs",
    [("byol_plain.py", None), ("lightly_byol.py", "lightly"), ("lightning_accumulate.py", "lightning")],
)
def test_example_runs(script, needs):
    if needs:
        pytest.importorskip(needs)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "examples" / script), "--steps", "3"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr


def test_readme_quick_start_runs_as_pasted():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md#quick-start", "exec"), namespace)
    assert int(namespace["predictor"].num_updates) == 10  # one DirectPred step per optimizer step


def test_lightning_example_survives_a_second_fit_with_one_target_update_per_optimizer_step():
    """attach() in configure_optimizers broke a second fit ("already attached"), and the
    EMA target moved once per micro-batch (twice per step with accumulate_grad_batches=2)."""
    pytest.importorskip("lightning")
    import importlib.util

    spec = importlib.util.spec_from_file_location("lightning_accumulate", ROOT / "examples" / "lightning_accumulate.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    module = example.BYOLModule()
    for _ in range(2):
        example.fit(module, 2)
    assert int(module.predictor.num_updates) == module.target_updates == 4


@pytest.mark.parametrize("script", ["byol_plain.py", "lightning_accumulate.py"])
def test_examples_use_the_librarys_byol_loss(script):
    """The examples call fastpred.losses.byol_loss instead of carrying their own copy of it."""
    source = (ROOT / "examples" / script).read_text()
    assert "from fastpred.losses import byol_loss" in source
    assert "def byol_loss" not in source and "cosine_similarity" not in source
