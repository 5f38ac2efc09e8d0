"""The CPU backend's per-step product inside whole models, at shapes the small models of the
other tests do not reach.

The time loops multiply by ``W_hh`` with the packed micro-kernels of
:mod:`numlstm.backends._packed` (tested alone in ``test_packed.py``). Here the shapes make
every kind of block appear inside a real forward and backward pass: hidden sizes whose
``4H`` (forward) and ``H`` (backward) leave a ragged last panel, several panels per group,
and batches that leave remainder rows after the 8-row blocks on each thread.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import numlstm


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize(
    ("hidden", "batch"),
    [(100, 13), (37, 1), (256, 5), (20, 33)],
    ids=["ragged-panels", "one-row", "wide", "many-rows"],
)
def test_a_model_matches_torch_at_every_block_shape(hidden, batch, dtype):
    torch = pytest.importorskip("torch")
    ours = numlstm.LSTM(3, hidden, bidirectional=True, dtype=dtype, seed=0)
    torch_dtype = getattr(torch, dtype)
    theirs = torch.nn.LSTM(3, hidden, bidirectional=True, dtype=torch_dtype)
    theirs.load_state_dict({k: torch.from_numpy(v) for k, v in ours.state_dict().items()})
    rng = np.random.default_rng(hidden)
    x = rng.standard_normal((4, batch, 3)).astype(dtype)
    d_output = rng.standard_normal((4, batch, 2 * hidden)).astype(dtype)

    output, (h_n, c_n) = ours(x)
    d_x, _ = ours.backward(d_output)

    x_torch = torch.from_numpy(x).requires_grad_(True)
    output_torch, (h_torch, c_torch) = theirs(x_torch)
    output_torch.backward(torch.from_numpy(d_output))
    assert_close(output, output_torch.detach().numpy(), dtype=dtype)
    assert_close(h_n, h_torch.detach().numpy(), dtype=dtype)
    assert_close(c_n, c_torch.detach().numpy(), dtype=dtype)
    assert_close(d_x, x_torch.grad.numpy(), dtype=dtype)
    for name, parameter in theirs.named_parameters():
        assert_close(ours.grads[name], parameter.grad.numpy(), name=name, dtype=dtype)
