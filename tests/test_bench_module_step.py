"""bench.module_step times what it says: the floor's four library calls, one training call
per step, and two per-view calls folded at the optimizer step."""
import pytest
import torch

from bench import module_step


def test_floor_step_is_the_four_library_calls():
    x = torch.randn(32, 8)
    corr = x.T @ x / 32
    y, gram = module_step.floor_step(x, corr)
    _, u = torch.linalg.eigh(corr)
    torch.testing.assert_close(gram, x.T @ x)
    torch.testing.assert_close(y, x @ (u @ u.T).T)


def test_module_cases_step_as_their_names_say():
    """Per call: one step per call; attached: both views folded as one step at optimizer.step()."""
    x = torch.randn(32, 8) + 0.1
    cases = module_step.module_cases(x, torch.eye(8))
    assert set(cases) == {"floor", "per call", "attached"}
    cases["per call"]()
    cases["attached"]()
    preds = [c.cell_contents for fn in (cases["per call"], cases["attached"]) for c in fn.__closure__
             if type(c.cell_contents).__name__ == "DirectPredictor"]  # the predictors each case closes over
    assert len(preds) == 2
    for pred in preds:  # one step each, and both fold the same 32 samples
        assert int(pred.num_updates) == 1
        torch.testing.assert_close(pred.corr, x.T @ x / 32)


def test_cuda_module_steps_refuses_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(RuntimeError, match="CUDA"):
        module_step.cuda_module_steps(dim=8, n=16, repeats=1)
