"""Where a warning issued inside fastpred should point: at the user's line."""

from __future__ import annotations

import os
import sys

_FASTPRED_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def _library_dirs() -> tuple[str, ...]:
    """fastpred's directory and torch's (optimizer hooks, nn.Module.__call__, torch.compile's
    eval_frame, the no_grad wrappers), without importing torch: the GPU eigh driver works on
    NumPy arrays too."""
    torch = sys.modules.get("torch")
    return (_FASTPRED_DIR,) + ((os.path.dirname(os.path.abspath(torch.__file__)) + os.sep,) if torch else ())


def user_stacklevel() -> int:
    """The ``stacklevel`` that makes a ``warnings.warn`` issued by the caller point at the
    first frame outside fastpred and torch: the user's call or ``optimizer.step()``."""
    library = _library_dirs()
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(library):
        frame, level = frame.f_back, level + 1
    return level
