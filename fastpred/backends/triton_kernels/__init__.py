"""The Triton kernels of the ``"triton"`` backend (:mod:`fastpred.backends.triton`), beside
the backend that launches them; imported lazily by :mod:`fastpred.backends`."""
