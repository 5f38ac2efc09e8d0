"""The CPU backend's own building blocks, where the rest of the suite would not reach them.

The per-step product of a few sequences with large recurrent weights runs as dot products
instead of BLAS (``numlstm.backends.cpu._rows_times_transposed``); the small models of the
other tests never take that path, so it is checked here, alone and in a whole model.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import numlstm
from numlstm.backends import cpu


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 8, 9])
def test_dot_product_path_equals_the_matrix_product(rows, dtype):
    rng = np.random.default_rng(rows)
    h = rng.standard_normal((rows, 37)).astype(dtype)
    w = rng.standard_normal((52, 37)).astype(dtype)
    out = np.empty((rows, 52), dtype)
    cpu._rows_times_transposed(h, w, out)
    assert_close(out, h.astype(np.float64) @ w.T.astype(np.float64), dtype=dtype)


def test_a_model_on_the_dot_product_path_matches_torch():
    """H = 256 makes W_hh 2^18 weights and a batch of 5 gives each thread at most 8
    sequences: the forward and backward per-step products both take the dot products."""
    torch = pytest.importorskip("torch")
    hidden, batch = 256, 5
    assert 4 * hidden * hidden >= cpu.DOT_PRODUCT_MIN_WEIGHTS
    assert batch <= cpu.DOT_PRODUCT_MAX_ROWS
    ours = numlstm.LSTM(3, hidden, bidirectional=True, dtype="float64", seed=0)
    theirs = torch.nn.LSTM(3, hidden, bidirectional=True, dtype=torch.float64)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, batch, 3))
    d_output = rng.standard_normal((4, batch, 2 * hidden))

    output, (h_n, c_n) = ours(x)
    d_x, _ = ours.backward(d_output)

    x_torch = torch.from_numpy(x).requires_grad_(True)
    output_torch, (h_torch, c_torch) = theirs(x_torch)
    output_torch.backward(torch.from_numpy(d_output))
    assert_close(output, output_torch.detach().numpy())
    assert_close(h_n, h_torch.detach().numpy())
    assert_close(c_n, c_torch.detach().numpy())
    assert_close(d_x, x_torch.grad.numpy())
    for name, parameter in theirs.named_parameters():
        assert_close(ours.grads[name], parameter.grad.numpy(), name=name)
