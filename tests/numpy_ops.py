"""``fastpred.backends.eigh_driver.ArrayOps`` over NumPy: host arrays whose ``info`` copies land
at once. Lets CI replay the GPU eigensolver's driver with NumPy stand-ins for cuSOLVER."""
import numpy as np


class _Landed:
    def __init__(self, values: np.ndarray) -> None:
        self._values = values

    def ready(self) -> bool:
        return True

    def wait(self) -> np.ndarray:
        return self._values


class NumpyOps:
    float32 = np.dtype(np.float32)
    float64 = np.dtype(np.float64)
    int32 = np.dtype(np.int32)

    def empty(self, shape, dtype):
        return np.empty(shape, dtype=dtype)

    def empty_host(self, nbytes):
        return np.empty(nbytes, dtype=np.uint8)

    def empty_device_bytes(self, nbytes):
        return np.empty(nbytes, dtype=np.uint8)

    def copy_as(self, a, shape, dtype):
        return np.ascontiguousarray(np.asarray(a, dtype=dtype).reshape(shape)).copy()

    def cast(self, a, dtype):
        return a.astype(dtype)

    def dtype_of(self, a):
        return np.asarray(a).dtype

    def transpose(self, a):
        return np.swapaxes(a, -1, -2)

    def mark_failed(self, w, info):
        w[np.asarray(info) != 0] = np.nan

    def start_to_host(self, info):
        return _Landed(np.array(info, copy=True))

    def capturing(self):
        return False

    def stream_key(self):
        return None
