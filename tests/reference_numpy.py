"""An independent float64 NumPy model of DirectPred, written from the paper and the
authors' trainer without any fastpred code: the yardstick of the tests."""
import numpy as np


def eig_map(s, eps, power, eps_mode, min_eig):
    s = np.maximum(np.asarray(s, dtype=np.float64), 0.0)
    top = s.max()
    if eps_mode == "relative":
        p = (s / top if top > 0 else np.zeros_like(s)) ** power + eps
        return np.maximum(p, min_eig)
    return s ** power + eps * top


def directpred_weight(F, eps, power, eps_mode, min_eig):
    s, U = np.linalg.eigh(np.asarray(F, dtype=np.float64))
    p = eig_map(s, eps, power, eps_mode, min_eig)
    return (U * p) @ U.T


class DirectPredNumpy:
    """Step-by-step model: rebuild if due, predict, fold the batch into F (Eq. 19)."""

    def __init__(self, W0, rho=0.3, eps=0.1, freq=1, power=0.5, eps_mode="relative",
                 zero_mean=False, min_eig=1e-4):
        self.W = np.array(W0, dtype=np.float64)
        self.F = None
        self.m = None
        self.k = 0  # statistics updates done
        self.cfg = dict(eps=eps, power=power, eps_mode=eps_mode, min_eig=min_eig)
        self.rho, self.freq, self.zero_mean = rho, freq, zero_mean

    def step(self, x):
        return self.step_calls([x])[0]

    def next_weight(self):
        """W as the next step will use it (the rebuild the last step made due included):
        what a DirectPredictor shows after a step (no stale W_p)."""
        if self.k >= 1 and (self.k - 1) % self.freq == 0:
            F = self.F - np.outer(self.m, self.m) if self.zero_mean else self.F
            return directpred_weight(F, **self.cfg)
        return self.W

    def step_calls(self, xs):
        """One optimizer step made of several calls (views, micro-batches): each call is
        predicted with the same W, then their samples are folded as ONE batch, as the
        authors fold both views of a step."""
        xs = [np.asarray(x, dtype=np.float64) for x in xs]
        if self.k >= 1 and (self.k - 1) % self.freq == 0:
            F = self.F - np.outer(self.m, self.m) if self.zero_mean else self.F
            self.W = directpred_weight(F, **self.cfg)
        ys = [x @ self.W.T for x in xs]
        x = np.concatenate(xs)
        # Per-sample outer products averaged, as the authors' code does.
        batch = np.mean([np.outer(v, v) for v in x], axis=0)
        mean = x.mean(axis=0)
        if self.F is None:
            self.F, self.m = batch, mean
        else:
            self.F = self.rho * self.F + (1 - self.rho) * batch
            self.m = self.rho * self.m + (1 - self.rho) * mean
        self.k += 1
        return ys
