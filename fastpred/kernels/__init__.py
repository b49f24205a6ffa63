"""Hand-written GPU kernels (Triton) behind the ``"triton"`` backend; imported lazily by :mod:`fastpred.backends`."""
