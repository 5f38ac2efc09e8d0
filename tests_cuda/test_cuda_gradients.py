"""The CUDA backend's gradients against central finite differences of its own forward pass.

The same check as ``tests/test_gradients.py`` (every element of every input and parameter,
float64), on the cuda backend, with few examples: each example runs hundreds of forward
passes, and the simulator is slow (about 0.1 s for a forward pass of one tiny layer): one
layer, either direction. Exact agreement with the CPU backend, whose gradients the main
lane checks the same way on every feature, is checked in ``test_cuda_parity.py`` for
stacks of layers; this test checks the CUDA gradients without trusting the CPU.
"""

from __future__ import annotations

from hypothesis import given, settings
from lstm_cases import cases
from test_gradients import check_functional_gradients

import numlstm


@settings(max_examples=3)
@given(case=cases(max_steps=3, max_batch=2, max_size=2, max_layers=1))
def test_cuda_gradients_match_finite_differences(case):
    check_cuda_gradients(case)


@settings(max_examples=2)
@given(case=cases(max_steps=3, max_batch=2, max_size=2, max_layers=1, cells=("peephole",)))
def test_cuda_peephole_gradients_match_finite_differences(case):
    check_cuda_gradients(case)


@settings(max_examples=2)
@given(case=cases(max_steps=3, max_batch=2, max_size=2, max_layers=1, cells=("ltm_stm",)))
def test_cuda_ltm_stm_gradients_match_finite_differences(case):
    check_cuda_gradients(case)


def check_cuda_gradients(case):
    """``tests/test_gradients.py``'s check, with the cuda backend as the process default."""
    numlstm.set_backend("cuda")
    try:
        check_functional_gradients(case)
    finally:
        numlstm.set_backend(None)
