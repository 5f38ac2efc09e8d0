"""The demo (the adding problem, Adam, a short training run) and the ``numlstm`` command."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import FD_RTOL, central_differences
from hypothesis import given
from hypothesis import strategies as st

import numlstm
from numlstm import demo
from numlstm.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent

#: The tiny run of the demo that the command-line tests use.
TINY_DEMO = ["demo", "--steps", "30", "--seq-len", "10", "--hidden", "8"]


# ---------------------------------------------------------------------------------------
# The adding problem
# ---------------------------------------------------------------------------------------

problem_sizes = {
    "seq_len": st.integers(2, 60),
    "batch": st.integers(1, 20),
    "seed": st.integers(0, 2**32 - 1),
}


@given(**problem_sizes)
def test_adding_problem_marks_exactly_one_step_in_each_half(seq_len, batch, seed):
    x, _ = demo.adding_problem(np.random.default_rng(seed), batch, seq_len)
    markers = x[:, :, 1]
    half = seq_len // 2
    assert set(np.unique(markers)) <= {0.0, 1.0}
    np.testing.assert_array_equal(markers[:half].sum(axis=0), 1)
    np.testing.assert_array_equal(markers[half:].sum(axis=0), 1)


@given(**problem_sizes)
def test_adding_problem_target_is_the_sum_of_the_marked_values(seq_len, batch, seed):
    x, y = demo.adding_problem(np.random.default_rng(seed), batch, seq_len)
    values, markers = x[:, :, 0], x[:, :, 1]
    np.testing.assert_array_equal(y, (values * markers).sum(axis=0))


@given(**problem_sizes)
def test_adding_problem_values_lie_in_the_unit_interval(seq_len, batch, seed):
    x, y = demo.adding_problem(np.random.default_rng(seed), batch, seq_len)
    assert x.shape == (seq_len, batch, 2)
    assert y.shape == (batch,)
    assert np.all((x[:, :, 0] >= 0) & (x[:, :, 0] <= 1))
    assert np.all((y >= 0) & (y <= 2))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_adding_problem_gives_the_dtype_asked_for(dtype):
    x, y = demo.adding_problem(np.random.default_rng(0), 3, 4, dtype)
    assert x.dtype == dtype
    assert y.dtype == dtype


@pytest.mark.parametrize(("batch", "seq_len"), [(0, 10), (4, 1)])
def test_adding_problem_rejects_sizes_without_a_sequence_or_room_for_two_markers(batch, seq_len):
    with pytest.raises(ValueError, match="batch" if batch < 1 else "seq_len"):
        demo.adding_problem(np.random.default_rng(0), batch, seq_len)


def test_baseline_of_answering_one_has_the_variance_of_the_target():
    _, y = demo.adding_problem(np.random.default_rng(0), 100_000, 10, np.float64)
    assert np.mean((y - demo.BASELINE_ANSWER) ** 2) == pytest.approx(1 / 6, rel=0.02)


# ---------------------------------------------------------------------------------------
# Adam, clipping and the model's hand-written readout gradient
# ---------------------------------------------------------------------------------------


def test_adam_finds_the_minimum_of_a_quadratic():
    rng = np.random.default_rng(0)
    scale = {"a": rng.uniform(0.1, 10, (3, 4)), "b": rng.uniform(0.1, 10, 5)}
    target = {name: rng.standard_normal(s.shape) for name, s in scale.items()}
    params = {name: np.zeros_like(t) for name, t in target.items()}
    optimizer = demo.Adam(params, lr=0.05)
    for step in range(2000):
        optimizer.lr = 0.05 * (1 - step / 2000)
        grads = {name: 2 * scale[name] * (p - target[name]) for name, p in params.items()}
        optimizer.step(grads)
    for name in params:
        np.testing.assert_allclose(params[name], target[name], atol=1e-3)


def test_adam_updates_the_arrays_it_was_given_in_place():
    param = np.ones(3)
    demo.Adam({"p": param}, lr=0.1).step({"p": np.ones(3)})
    np.testing.assert_allclose(param, 0.9)


def test_clip_global_norm_scales_all_gradients_to_the_norm_together():
    grads = {"a": np.array([3.0, 0.0]), "b": np.array([[4.0]])}
    assert demo.clip_global_norm(grads, 1.0) == pytest.approx(5.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0])
    np.testing.assert_allclose(grads["b"], [[0.8]])
    demo.clip_global_norm(grads, 10.0)
    np.testing.assert_allclose(grads["a"], [0.6, 0.0])


@pytest.mark.parametrize("cell", ["standard", "peephole", "ltm_stm"])
def test_model_gradients_match_finite_differences(cell):
    rng = np.random.default_rng(1)
    model = demo.AddingModel(hidden=3, rng=rng, dtype="float64", cell=cell)
    x, y = demo.adding_problem(rng, batch=5, seq_len=4, dtype=np.float64)
    model.zero_grad()
    model.loss_and_backward(x, y)
    grads = {name: g.copy() for name, g in model.grads().items()}

    def loss():
        error = model.predict(x) - y
        return np.mean(error * error)

    for name, param in model.parameters().items():
        numeric = central_differences(loss, param)
        scale = max(np.max(np.abs(numeric)), 1e-12)
        assert np.max(np.abs(grads[name] - numeric)) <= FD_RTOL * scale, name


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def test_a_short_training_run_decreases_the_loss():
    result = demo.train(seq_len=5, hidden=8, steps=150, batch_size=16, seed=0, test_size=200)
    assert result.losses.shape == (150,)
    assert np.all(np.isfinite(result.losses))
    assert result.losses[-20:].mean() < 0.5 * result.losses[:20].mean()
    assert result.test_mse < result.baseline_mse
    assert result.baseline_mse == pytest.approx(1 / 6, abs=0.05)


def test_training_is_reproducible_from_its_seed():
    runs = [demo.train(seq_len=4, hidden=4, steps=5, seed=7, test_size=10) for _ in range(2)]
    np.testing.assert_array_equal(runs[0].losses, runs[1].losses)
    assert runs[0].test_mse == runs[1].test_mse


def test_progress_prints_about_ten_lines_when_not_on_a_terminal():
    stream = io.StringIO()
    progress = demo.Progress(100, stream)
    for step in range(1, 101):
        progress(step, 1.0 / step)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 10
    assert "\r" not in stream.getvalue()
    assert "100/100" in lines[-1]


def test_progress_redraws_one_line_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    progress = demo.Progress(50, stream)
    for step in range(1, 51):
        progress(step, 0.5)
    text = stream.getvalue()
    assert text.count("\n") == 1
    assert text.endswith("\n")
    assert "\r" in text
    assert "50/50" in text.split("\r")[-1]
    assert "loss 0.5000" in text


# ---------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------


def test_info_lists_every_backend_with_its_status(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"numlstm {numlstm.__version__}" in out
    for name in ("NumPy", "Numba", "SciPy", "default backend"):
        assert name in out
    for name, status in numlstm.available_backends().items():
        state = "available" if status.available else "unavailable"
        assert any(
            line.split()[:2] == [name, state] and status.reason in line for line in out.splitlines()
        ), f"{name} {state} not in:\n{out}"


def test_demo_prints_the_test_mse_beside_the_baseline_and_a_verdict(capsys):
    assert main(TINY_DEMO) == 0
    captured = capsys.readouterr()
    assert "test MSE on 1000 new sequences:" in captured.out
    assert "baseline MSE (always answering 1.0):" in captured.out
    verdict = captured.out.splitlines()[-1]
    assert verdict.startswith(("solved:", "not solved yet:"))
    assert "30/30" in captured.err


@pytest.mark.skipif(numlstm.available_backends()["cuda"].available, reason="this machine runs CUDA")
@pytest.mark.parametrize("cell", ["peephole", "ltm_stm"])
def test_demo_trains_the_cell_asked_for(capsys, cell):
    assert main([*TINY_DEMO, "--cell", cell]) == 0
    captured = capsys.readouterr()
    assert f"model: LSTM(2, 8, cell='{cell}')" in captured.out
    assert captured.out.splitlines()[-1].startswith(("solved:", "not solved yet:"))


def test_demo_on_a_missing_backend_exits_2_with_one_message(capsys):
    assert main([*TINY_DEMO, "--backend", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "'cuda' backend is not available" in captured.err
    assert len(captured.err.strip().splitlines()) == 1
    assert "Traceback" not in captured.err


def test_demo_with_a_bad_backend_environment_variable_exits_2(capsys, monkeypatch):
    monkeypatch.setenv("NUMLSTM_BACKEND", "gpu")
    assert main(TINY_DEMO) == 2
    assert "NUMLSTM_BACKEND" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("--seq-len", "1"),
        ("--seq-len", "ten"),
        ("--hidden", "0"),
        ("--steps", "-5"),
        ("--batch-size", "0"),
        ("--lr", "0"),
        ("--lr", "nan"),
        ("--seed", "-1"),
        ("--backend", "gpu"),
        ("--cell", "gru"),
    ],
)
def test_demo_rejects_bad_values_as_usage_errors(capsys, option, value):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, value])
    assert exit_info.value.code == 2
    assert f"argument {option}" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["--help"]])
def test_without_a_command_or_with_help_it_prints_usage(capsys, argv):
    try:
        code = main(argv)
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: numlstm")
    assert "demo" in out and "info" in out


def test_python_dash_m_numlstm_prints_the_version():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(
        [sys.executable, "-m", "numlstm", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=env,
        timeout=60,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"numlstm {numlstm.__version__}"
