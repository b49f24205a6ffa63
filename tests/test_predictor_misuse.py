"""Misuse a new user runs into, named once at the user's line, and copies taken mid-step.

Expected values come from a fresh predictor fed the same batches (the step-boundary
semantics written in the class docstring), not from the code under test.
"""
import copy
import pickle
import warnings

import pytest
import torch
from torch import nn

from fastpred import DirectPredictor

D = 6


def batch(seed, n=16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g) + 0.3


# ------------------------------------------------------------------ eval mode left on
def test_a_per_call_predictor_left_in_eval_mode_warns_once_at_the_users_line():
    """model.train() forgotten after validation: calls inside a training graph record
    nothing, so F and W_p would stay frozen in silence; named at the optimizer step."""
    torch.manual_seed(0)
    backbone, pred = nn.Linear(D, D), DirectPredictor(D)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.01)
    pred(backbone(batch(0)))  # a training step
    pred.eval()
    with pytest.warns(RuntimeWarning, match="eval mode inside a training graph") as record:
        for seed in range(3):
            opt.zero_grad()
            pred(backbone(batch(seed))).sum().backward()
            opt.step()
    assert len([w for w in record if "eval mode" in str(w.message)]) == 1
    assert record[0].filename == __file__  # the user's line, not fastpred's or torch's
    assert int(pred.num_updates) == 1


def test_eval_mode_under_no_grad_through_a_frozen_predictor_or_in_training_mode_is_not_named():
    torch.manual_seed(0)
    backbone, pred = nn.Linear(D, D), DirectPredictor(D)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pred(backbone(batch(0))).sum().backward()  # training mode: a step
        opt.step()
        pred.eval()
        with torch.no_grad():
            pred(backbone(batch(1)))  # a validation pass done right
        opt.step()
        z = batch(2).requires_grad_()
        pred(z).sum().backward()  # a gradient through a frozen predictor, no optimizer step
        pred.train()
        pred(backbone(batch(3))).sum().backward()
        opt.step()


# ------------------------------------------------------------------ freq > 1, W_p trained by nothing
def test_per_call_freq_above_one_with_w_p_in_no_optimizer_warns_once():
    torch.manual_seed(0)
    backbone, pred = nn.Linear(D, D), DirectPredictor(D, freq=2)
    opt = torch.optim.SGD(backbone.parameters(), lr=0.01)  # the predictor's W_p left out
    with pytest.warns(RuntimeWarning, match="no optimizer steps W_p") as record:
        for seed in range(6):
            opt.zero_grad()
            pred(backbone(batch(seed))).sum().backward()
            opt.step()
    assert len([w for w in record if "no optimizer steps W_p" in str(w.message)]) == 1
    assert record[0].filename == __file__


@pytest.mark.parametrize("separate", [False, True])
def test_per_call_freq_above_one_with_w_p_in_an_optimizer_is_not_named(separate):
    torch.manual_seed(0)
    backbone, pred = nn.Linear(D, D), DirectPredictor(D, freq=2)
    if separate:  # one optimizer for the backbone, one for the predictor
        opts = [torch.optim.SGD(backbone.parameters(), lr=0.01), torch.optim.SGD(pred.parameters(), lr=0.01)]
    else:
        opts = [torch.optim.SGD([*backbone.parameters(), *pred.parameters()], lr=0.01)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for seed in range(6):
            for opt in opts:
                opt.zero_grad()
            pred(backbone(batch(seed))).sum().backward()
            for opt in opts:
                opt.step()


# ------------------------------------------------------------------ copies mid-step
def attached_mid_step():
    """An attached predictor after two steps and one more training call (its step not ended)."""
    torch.manual_seed(0)
    pred = DirectPredictor(D)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    pred.attach(opt)
    for seed in range(2):
        pred(batch(seed))
        opt.step()
    boundary = copy.deepcopy(pred.state_dict())
    pred(batch(10))  # recorded; the optimizer step that would fold it has not come
    return pred, opt, boundary


def fresh_from(state):
    fresh = DirectPredictor(D)
    fresh.load_state_dict(state)
    return fresh


@pytest.mark.parametrize("copy_of", ["deepcopy", "pickle"])
@pytest.mark.parametrize("reattach", [False, True])
def test_a_copy_taken_mid_step_starts_at_the_step_boundary(copy_of, reattach):
    """deepcopy and pickle agree, re-attached or not: the half-finished step stays with
    the original, as attach() drops it too."""
    pred, _, boundary = attached_mid_step()
    twin = copy.deepcopy(pred) if copy_of == "deepcopy" else pickle.loads(pickle.dumps(pred))
    expected = fresh_from(boundary)
    if reattach:
        opts = [torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1) for _ in range(2)]
        twin.attach(opts[0]), expected.attach(opts[1])
        twin(batch(20)), expected(batch(20))
        opts[0].step(), opts[1].step()
    else:
        twin(batch(20)), expected(batch(20))  # per-call: one step
    torch.testing.assert_close(twin.corr, expected.corr, rtol=0, atol=0)
    torch.testing.assert_close(twin.weight, expected.weight, rtol=0, atol=0)
    assert int(twin.num_updates) == int(expected.num_updates) == 3


def test_the_original_keeps_its_half_finished_step_after_being_copied():
    pred, opt, boundary = attached_mid_step()
    copy.deepcopy(pred)
    expected = fresh_from(boundary)
    expected(batch(10))  # per-call: the step the original still owes, as one
    opt.step()
    torch.testing.assert_close(pred.corr, expected.corr, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ state_dict version
def test_state_dict_records_its_layout_version():
    state = DirectPredictor(D).state_dict()
    assert state._metadata[""]["version"] == DirectPredictor._version == 2
