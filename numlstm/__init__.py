"""numlstm: a Numba-accelerated LSTM with exact gradients and the semantics of torch.nn.LSTM.

NumPy arrays (or CUDA arrays) go in; outputs and exact gradients come out. The gate loops
are ``@njit`` kernels on the CPU (and ``@cuda.jit`` kernels on NVIDIA GPUs), chosen by one
dispatch layer.

>>> import numlstm
>>> lstm = numlstm.LSTM(input_size=8, hidden_size=32)
>>> output, (h_n, c_n) = lstm(x)
>>> d_x, (d_h0, d_c0) = lstm.backward(d_output)
"""

from .backends import (
    BackendStatus,
    BackendUnavailableError,
    available_backends,
    get_backend,
    set_backend,
)
from .functional import Tape, backward, forward
from .grad_mode import is_grad_enabled, no_grad
from .lstm import LSTM
from .onnx import from_onnx, to_onnx  # imports the onnx package only when called
from .params import LSTMSpec

__version__ = "0.1.0"

__all__ = [
    "LSTM",
    "BackendStatus",
    "BackendUnavailableError",
    "LSTMSpec",
    "Tape",
    "__version__",
    "available_backends",
    "backward",
    "forward",
    "from_onnx",
    "get_backend",
    "is_grad_enabled",
    "no_grad",
    "set_backend",
    "to_onnx",
]
