"""The losses of the DirectPred family: BYOL's prediction loss and IsoLoss.

Both compare, per view pair, the online prediction ``p`` of one view with the target
projection ``z_target`` of the other view, in one of two forms:

- ``"cosine"``: ``2 - 2 cos(p, z_target)`` (BYOL, Grill et al. 2020, Eq. 2);
- ``"euclidean"``: ``|p - z_target|^2`` (the form of DirectPred's analysis).

:func:`isoloss` is IsoLoss (Halvagal, Laborieux & Zenke, "Implicit variance regularization in
non-contrastive SSL", NeurIPS 2023) for a predictor set in closed form from F, like
:class:`fastpred.DirectPredictor`. Its gradient with respect to the online projection ``z`` is
the gradient of the BYOL loss with respect to ``p``, handed to ``z`` without the predictor's
Jacobian ``W_p^T``; so it needs no ``W_p^(1/2)`` and no second eigendecomposition.
``docs/isoloss.md`` derives this from the published formula.

Every function here works on one view pair: call it once per pair, whether the predictions of
both views came from one concatenated predictor call or from one call per view. The loss is
computed with autocast off, in float32 for half-precision inputs (float64 stays float64).

An empty batch (``N = 0``, a rank whose shard is empty, as :class:`fastpred.DirectPredictor`
allows) gives a loss of exactly 0 that keeps the graph: its backward reaches every parameter
with a zero gradient, so DDP's all-reduce of the other ranks' gradients goes on (a mean over no
samples would be NaN and poison them).
"""
from __future__ import annotations

import torch
import torch.nn.functional as nnf
from torch import Tensor

__all__ = ["FORMS", "byol_loss", "isoloss"]

FORMS = ("cosine", "euclidean")


def _check(form: str, **tensors: Tensor) -> None:
    """Every tensor a floating ``(N, d)`` of the same shape, ``form`` one of :data:`FORMS`."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (N, d), got {tuple(t.shape)}")
        if shape is not None and t.shape != shape:
            names = ", ".join(tensors)
            raise ValueError(f"{names} must have the same shape, got {[tuple(u.shape) for u in tensors.values()]}")
        shape = t.shape


def _at_least_float32(x: Tensor) -> Tensor:
    """float16 / bfloat16 up to float32; float32 and float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _pair_loss(p: Tensor, z_target: Tensor, form: str) -> Tensor:
    """The batch mean of the per-sample loss, in float32 or wider (autocast off); for an empty
    batch, 0 with the graph kept (the sum over no samples), not the NaN of an empty mean."""
    with torch.autocast(p.device.type, enabled=False):
        p, t = _at_least_float32(p), _at_least_float32(z_target)
        if form == "cosine":
            per_sample = 2 - 2 * nnf.cosine_similarity(p, t, dim=-1)
        else:
            per_sample = (p - t).pow(2).sum(dim=-1)
        return per_sample.mean() if per_sample.numel() else per_sample.sum()


def byol_loss(p: Tensor, z_target: Tensor, form: str = "cosine") -> Tensor:
    """BYOL's prediction loss of one view pair, averaged over the batch.

    ``cosine``: ``mean_i (2 - 2 cos(p_i, t_i))`` (BYOL Eq. 2; DirectPred's normalised MSE).
    ``euclidean``: ``mean_i |p_i - t_i|^2``.

    The target is used as given: pass ``z_target.detach()`` for BYOL's stop-gradient (a trainer
    that studies the no-stop-gradient case passes it attached).

    Args:
        p: ``(N, d)`` predictions of the online network for one view.
        z_target: ``(N, d)`` target projections of the other view.
        form: ``"cosine"`` or ``"euclidean"``.

    Returns:
        A scalar, float32 (float64 for float64 inputs); 0 with the graph kept for ``N = 0``.

    Raises:
        ValueError: ``form`` unknown, or shapes not ``(N, d)`` alike.
        TypeError: an argument is not a floating-point tensor.

    Example:
        >>> p, t = torch.randn(8, 4), torch.randn(8, 4)
        >>> loss = byol_loss(p, t.detach())
    """
    _check(form, p=p, z_target=z_target)
    return _pair_loss(p, z_target, form)


def isoloss(z: Tensor, p: Tensor, z_target: Tensor, form: str = "cosine") -> Tensor:
    """IsoLoss (Halvagal, Laborieux & Zenke, NeurIPS 2023) of one view pair.

    The published loss, with ``p = W_p z`` and ``p_sqrt = W_p^(1/2) z`` for a symmetric PSD
    ``W_p`` set from F, and ``sg`` the stop-gradient, is

    - cosine: ``-2 mean_i [ z.sg(t) / sg(|p||t|) - 1/2 sg(p.t / (|p|^3 |t|)) |p_sqrt|^2 ]``;
    - euclidean: ``mean_i |z - sg(t + z - p)|^2``.

    Differentiating the cosine form in ``z``: the first term gives ``t / (|p||t|)`` and, since
    ``|p_sqrt|^2 = z^T W_p z``, the second gives ``-c W_p z = -c p`` with
    ``c = p.t / (|p|^3 |t|)``. Their sum is exactly ``d cos(p, t) / dp``: the published gradient
    with respect to ``z`` is the gradient of the BYOL loss with respect to ``p``, applied to
    ``z`` without the factor ``W_p^T`` that back-propagating through the predictor would add.
    The Euclidean form's gradient is ``2 (p - t)``, likewise ``d |p - t|^2 / dp``. This function
    computes exactly that: the BYOL loss of ``p`` with ``p``'s gradient routed to ``z``. It
    needs neither ``W_p^(1/2)`` nor ``W_p`` itself, so it costs nothing beyond DirectPred and
    holds for any symmetric PSD ``W_p`` (any eigenvalue map, DirectCopy's closed form, random
    partitions, whose per-sample ``W_p`` is a mean of PSD matrices). Derivation and checks:
    ``docs/isoloss.md``.

    Where IsoLoss is undefined: for a predictor trained by gradient (a free linear map or an
    MLP). Its loss sends no gradient to ``W_p`` (the published one only reaches ``z``), so such
    a predictor would never learn, and ``W_p^(1/2)`` does not exist for a non-symmetric or
    indefinite ``W_p`` (an MLP has no ``W_p`` at all). This function cannot see where ``p``
    came from; the trainer refuses those combinations (``loss.name=isoloss`` needs
    ``predictor.name=directpred`` with ``freq=1``).

    The returned value is the BYOL loss of ``p`` (:func:`byol_loss`, same ``form``), so logs of
    IsoLoss and BYOL runs read on one scale: ``2 - 2 cos`` in [0, 4] for ``cosine``. For the
    Euclidean form this is also the published loss's value; for the cosine form the published
    surrogate's value (``-2 mean(sim)``, a function of ``z . t`` rather than ``p . t``) has no
    meaning of its own and is not reproduced.

    Args:
        z: ``(N, d)`` online projections of one view: the predictor's input.
        p: ``(N, d)`` the predictor's output for ``z`` (``W_p z``); its graph is not used.
        z_target: ``(N, d)`` target projections of the other view; always detached here (the
            stop-gradient is part of IsoLoss's definition).
        form: ``"cosine"`` or ``"euclidean"``.

    Returns:
        A scalar, float32 (float64 for float64 inputs), whose gradient flows to ``z`` only; 0
        with the graph kept for ``N = 0``.

    Raises:
        ValueError: ``form`` unknown, or shapes not ``(N, d)`` alike.
        TypeError: an argument is not a floating-point tensor.

    Example:
        >>> pred = DirectPredictor(4)  # doctest: +SKIP
        >>> z1, z2 = online(v1), online(v2)  # doctest: +SKIP
        >>> loss = isoloss(z1, pred(z1), target(v2)) + isoloss(z2, pred(z2), target(v1))  # doctest: +SKIP
    """
    _check(form, z=z, p=p, z_target=z_target)
    # Value p exactly (z - z.detach() is exactly 0), derivative the identity in z: the loss's
    # gradient with respect to p lands on z unchanged.
    z = _at_least_float32(z)
    through = _at_least_float32(p.detach()) + (z - z.detach())
    return _pair_loss(through, z_target.detach(), form)
