"""Which arrays come back, where parameters live, and the paths beside forward_backward.

NumPy in gives NumPy out, with the parameters uploaded once and kept while they are
unchanged; CUDA arrays in give device arrays out without any copy to the host; inference
in chunks, non-contiguous device input and the LSTM class give what the CPU gives.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close, to_host
from lstm_cases import forward_backward, make_arrays
from numba import cuda
from test_cuda_parity import CASES

import numlstm
from numlstm.backends import cuda as cuda_backend
from numlstm.backends import cuda_array, is_cuda_array

FEATURES = CASES["bidirectional-projection-lengths-states"]


def test_cuda_is_available_with_a_reason():
    status = numlstm.available_backends()["cuda"]
    assert status.available, status.reason
    assert "numba-cuda kernels" in status.reason


def test_device_arrays_in_give_device_arrays_out_without_host_copies(
    launch, on_backend, monkeypatch
):
    arrays = make_arrays(FEATURES)
    expected = on_backend("cpu", forward_backward, FEATURES, arrays)

    def device(array):
        return cuda.to_device(array)

    device_type = type(device(np.zeros(1)))

    def no_host_copy(*args, **kwargs):
        raise AssertionError("a device array was copied to the host")

    monkeypatch.setattr(device_type, "copy_to_host", no_host_copy)
    output, (h_n, c_n), tape = numlstm.forward(
        device(arrays.x),
        arrays.params,
        tuple(device(a) for a in arrays.hx),
        FEATURES.lengths,
        batch_first=FEATURES.batch_first,
        dropout_masks=[device(m) for m in arrays.masks or []] or None,
    )
    d_x, (d_h0, d_c0), grads = numlstm.backward(
        tape, device(arrays.d_output), (device(arrays.d_h_n), device(arrays.d_c_n))
    )
    monkeypatch.undo()
    actual = {"output": output, "h_n": h_n, "c_n": c_n, "d_x": d_x, "d_h0": d_h0, "d_c0": d_c0}
    actual |= {f"d_{name}": grad for name, grad in grads.items()}
    assert set(actual) == set(expected)
    for name, value in actual.items():
        assert is_cuda_array(value), f"{name}: device in must give device out"
        assert_close(to_host(value), expected[name], name=name)


def test_non_contiguous_device_input_gives_what_the_cpu_gives(launch):
    arrays = make_arrays(FEATURES)
    wide = np.repeat(arrays.x, 2, axis=2)  # every feature twice: x is wide[:, :, ::2]
    strided = cuda.to_device(wide)[:, :, ::2]
    assert not strided.is_c_contiguous()
    kwargs = {"lengths": FEATURES.lengths, "batch_first": FEATURES.batch_first}
    expected, _, _ = numlstm.forward(arrays.x, arrays.params, arrays.hx, **kwargs)
    output, _, _ = numlstm.forward(strided, arrays.params, arrays.hx, **kwargs)
    assert_close(to_host(output), expected, name="output")


@pytest.mark.parametrize("chunk", [1, 3])
def test_inference_in_chunks_gives_what_the_cpu_gives(chunk, launch, monkeypatch, on_backend):
    monkeypatch.setattr(cuda_backend, "INFERENCE_CHUNK", chunk)
    arrays = make_arrays(FEATURES)

    def run():
        with numlstm.no_grad():
            output, (h_n, c_n), tape = numlstm.forward(
                arrays.x,
                arrays.params,
                arrays.hx,
                FEATURES.lengths,
                batch_first=FEATURES.batch_first,
            )
        assert tape is None
        return {"output": output, "h_n": h_n, "c_n": c_n}

    expected = on_backend("cpu", run)
    actual = on_backend("cuda", run)
    for name, value in expected.items():
        assert_close(actual[name], value, name=name)


def test_numpy_parameters_stay_on_the_device_until_changed_in_place(launch):
    model = numlstm.LSTM(3, 4, num_layers=2, dtype="float64", backend="cuda", seed=1)
    x = np.random.default_rng(2).standard_normal((3, 2, 3))
    weights = [p for name, p in model.named_parameters() if name.startswith("weight")]
    model(x)
    uploaded = [cuda_array._PARAMETERS[id(w)].device for w in weights]
    model(x)
    assert [cuda_array._PARAMETERS[id(w)].device for w in weights] == uploaded
    for w in weights:
        w *= 0.5  # an in-place update, as an optimiser makes
    output, _ = model(x)
    reuploaded = [cuda_array._PARAMETERS[id(w)].device for w in weights]
    assert all(new is not old for new, old in zip(reuploaded, uploaded, strict=True))
    reference = numlstm.LSTM(3, 4, num_layers=2, dtype="float64", backend="cpu", seed=1)
    reference.load_state_dict(model.state_dict())
    assert_close(output, reference(x)[0], name="output after the update")


def test_lstm_class_with_dropout_in_training_mode_matches_the_cpu_model(launch):
    """Same seed, same masks: the models agree on outputs, input gradients and ``grads``."""
    x = np.random.default_rng(4).standard_normal((4, 3, 3))
    kwargs = {"num_layers": 2, "dropout": 0.5, "bidirectional": True, "dtype": "float64"}
    models = {b: numlstm.LSTM(3, 4, backend=b, seed=9, **kwargs) for b in ("cpu", "cuda")}
    results = {}
    for backend, model in models.items():
        output, (h_n, c_n) = model(x, lengths=[4, 2, 3])
        d_x, (d_h0, d_c0) = model.backward(np.ones_like(output))
        results[backend] = {"output": output, "h_n": h_n, "c_n": c_n, "d_x": d_x}
        results[backend] |= {"d_h0": d_h0, "d_c0": d_c0, **model.grads}
    for name, value in results["cpu"].items():
        assert isinstance(results["cuda"][name], np.ndarray), name
        assert_close(results["cuda"][name], value, name=name)
