"""The benchmark harness (bench/cpu.py): its grid, FLOP count, flags and outputs.

The harness runs here on tiny configurations with short timings, in this process; the
tests check what it writes (JSON keys, table rows, plot), never how fast anything ran.
"""

from __future__ import annotations

import json
import os

import numba  # noqa: F401 (loaded before the harness runs, as in the rest of the session)
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench import cpu  # noqa: E402 (after the skip: the harness imports torch)

TINY = (
    cpu.Config(6, 2, 3, 4, 1),
    cpu.Config(5, 2, 3, 4, 2),
    cpu.Config(5, 1, 3, 4, 2, bidirectional=True),
)


def test_forward_flops_count_each_layer_with_its_input_size():
    config = cpu.Config(T=5, B=2, I=3, H=4, layers=2)
    first, second = 2 * 5 * 2 * 4 * 4 * (3 + 4), 2 * 5 * 2 * 4 * 4 * (4 + 4)
    assert config.forward_flops() == first + second
    assert config.flops("forward") == first + second
    assert config.flops("train") == 3 * (first + second)
    # Bidirectional: each layer twice, and the second one reads both directions' outputs.
    both = cpu.Config(T=5, B=2, I=3, H=4, layers=2, bidirectional=True)
    first, second = 2 * 5 * 2 * 4 * 4 * (3 + 4), 2 * 5 * 2 * 4 * 4 * (8 + 4)
    assert both.forward_flops() == 2 * (first + second)


def test_configs_are_grid_indices_or_five_integers():
    assert cpu.parse_config("2") == cpu.Config(100, 64, 256, 256, 1)
    assert cpu.parse_config("7,3,2,5,2") == cpu.Config(7, 3, 2, 5, 2)
    assert cpu.parse_config("7,3,2,5,2").label == "7,3,2,5,2"
    assert cpu.parse_config("7,3,2,5,2,bi") == cpu.Config(7, 3, 2, 5, 2, bidirectional=True)
    assert cpu.parse_config("7,3,2,5,2,bi").label == "7,3,2,5,2,bi"
    bad = (str(len(cpu.GRID)), "7,3,2,5", "7,3,2,5,0", "7,3,x,5,1", "7,3,2,5,1,2", "7,3,2,5,bi")
    for text in bad:
        with pytest.raises(ValueError, match="--configs"):
            cpu.parse_config(text)


def test_compare_times_runs_of_each_side_without_their_first_call():
    calls = []
    first, second = (lambda: calls.append("a")), (lambda: calls.append("b"))
    times = cpu.compare(first, second, min_time=0.0, min_repeats=4, block=3)
    # Rounds of 3 calls a side, alternating which side goes first; 2 timed calls each.
    assert calls == list("aaabbb" + "bbbaaa")
    assert [len(t) for t in times] == [4, 4]
    assert all(t >= 0 for side in times for t in side)
    with pytest.raises(ValueError, match="block"):
        cpu.compare(first, second, 0.0, 1, block=1)


def test_issue_grid_and_default_dtype_plan():
    assert [config.label for config in cpu.GRID] == [
        "50,16,32,64,1",
        "100,32,64,128,1",
        "100,64,256,256,1",
        "200,8,128,512,1",
        "100,32,128,256,2",
        "1000,1,32,64,1",
    ]
    default = cpu.plan(list(cpu.GRID), None)
    assert [config for config, dtype in default if dtype == "float32"] == list(cpu.GRID)
    assert [config.label for config, dtype in default if dtype == "float64"] == [
        "50,16,32,64,1",
        "100,32,64,128,1",
        "100,64,256,256,1",
    ]
    assert cpu.plan(list(TINY), "float64") == [(config, "float64") for config in TINY]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--configs", "1,2,3"], "--configs: expected a grid index or five positive integers"),
        (["--threads", "0"], "--threads: expected a positive int, got '0'"),
        (["--repeats", "-3"], "--repeats: expected a positive int, got '-3'"),
        (["--min-time", "soon"], "--min-time: expected a positive float, got 'soon'"),
    ],
)
def test_bad_flags_exit_with_a_usage_error(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cpu.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def _calm_report(**changes):
    peak = {"start": {"gflops": 100.0}, "end": {"gflops": 95.0}}
    report = {
        "logical_cpus": 4,
        "threads": {"requested": 2},
        "load_average": (0.3, 0.2, 0.1),
        "load_average_end": (2.4, 1.0, 0.5),
        "gemm_peak": {"float32": peak},
    }
    return {**report, **changes}


def test_busy_machine_is_flagged():
    assert cpu._busy_warnings(_calm_report()) == []
    busy_start = cpu._busy_warnings(_calm_report(load_average=(2.9, 1.0, 1.0)))
    assert busy_start == [
        "1-minute load average 2.90 at the start on 4 logical CPUs: other processes were running"
    ]
    assert "at the end" in cpu._busy_warnings(_calm_report(load_average_end=(4.6, 2, 1)))[0]
    unstable = {"float32": {"start": {"gflops": 100.0}, "end": {"gflops": 80.0}}}
    assert cpu._busy_warnings(_calm_report(gemm_peak=unstable)) == [
        "the float32 GEMM peak changed from 100.0 to 80.0 GF/s during the run"
    ]
    # Right after another run of this process (--runs), its threads still count at the start.
    assert cpu._busy_warnings(_calm_report(load_average=(2.4, 1, 1), follows_a_run=True)) == []
    assert cpu._busy_warnings(_calm_report(load_average=(4.6, 2, 1), follows_a_run=True))


def _run_report(ratio, peak_pct, gflops_peak, warnings=(), date="d"):
    """A report of one run with one row, as :func:`cpu.run` lays it out."""
    row = {"label": "6,2,3,4,1", "dtype": "float32", "mode": "train", "flops": 1000,
           "repeats": 5, "ratio": ratio, "numlstm_s": ratio, "torch_s": 1.0,
           "numlstm_peak_pct": peak_pct, "numlstm_gflops": 1.0, "torch_gflops": 1.0,
           "torch_peak_pct": 1.0, "ratio_at_peak": ratio * peak_pct / 100}  # fmt: skip
    peak = {"size": 64, "gflops": gflops_peak, "start": {"gflops": gflops_peak},
            "end": {"gflops": gflops_peak}}  # fmt: skip
    return {**_calm_report(gemm_peak={"float32": peak}), "date": date, "parity": [date],
            "results": [row], "busy_warnings": list(warnings)}  # fmt: skip


def test_runs_are_summarised_by_medians_and_their_spread():
    reports = [
        _run_report(0.5, 80.0, 300.0, date="a"),
        _run_report(0.7, 90.0, 320.0, ["busy"], date="b"),
        _run_report(0.6, 70.0, 310.0, date="c"),
    ]
    merged = cpu.across_runs(reports)
    (row,) = merged["results"]
    assert row["ratio"] == row["numlstm_s"] == pytest.approx(0.6)
    assert (row["ratio_min"], row["ratio_max"]) == (0.5, 0.7)
    assert row["numlstm_peak_pct"] == 80.0
    assert row["ratio_at_peak"] == pytest.approx(0.42)  # of 0.40, 0.63 and 0.42
    assert (row["numlstm_peak_pct_min"], row["numlstm_peak_pct_max"]) == (70.0, 90.0)
    assert row["repeats"] == 5 and row["flops"] == 1000  # counts stay as they were
    assert merged["gemm_peak"]["float32"]["gflops"] == 310.0
    assert merged["gemm_peak"]["float32"]["runs"] == [300.0, 320.0, 310.0]
    assert merged["busy_warnings"] == ["run 2: busy"]
    assert merged["parity"] == ["a", "b", "c"]
    assert [run["date"] for run in merged["runs"]] == ["a", "b", "c"]
    assert merged["runs"][1]["results"][0]["ratio"] == 0.7
    table = cpu.markdown({**merged, "cpu": "x", "versions": {}, "torch_path": {}}, "cmd")
    assert "then medians over 3 runs of the whole plan" in table
    assert "the median of the runs' 300.0, 320.0, 310.0" in table
    assert "| 6,2,3,4,1 | float32 | train | 0.50 | 0.60 | 0.70 | 70 | 90 |" in table


@pytest.fixture
def restored_thread_env(monkeypatch):
    """main() sets the thread variables of this process; put them back afterwards."""
    for var in cpu.THREAD_ENV_VARS:
        if var in os.environ:
            monkeypatch.setenv(var, os.environ[var])
        else:
            monkeypatch.delenv(var, raising=False)


def test_harness_writes_json_table_and_plot(tmp_path, restored_thread_env, capsys):
    threads_before = torch.get_num_threads()
    numba_env_before = os.environ.get("NUMBA_NUM_THREADS")
    argv = ["--configs", *(config.label for config in TINY), "--dtype", "float32"]
    argv += ["--threads", "1", "--min-time", "0.005", "--repeats", "3"]
    argv += ["--gemm-size", "64", "--out", str(tmp_path)]
    report = cpu.main(argv)

    assert torch.get_num_threads() == threads_before
    written = json.loads((tmp_path / "cpu.json").read_text())
    assert written["command"] == "python -m bench " + " ".join(argv)
    for key in ("date", "cpu", "versions", "threads", "gemm_peak", "torch_path", "parity"):
        assert written[key] == report[key]
    assert written["busy_warnings"] == report["busy_warnings"] == cpu._busy_warnings(report)
    assert {"numlstm", "numpy", "numba", "torch"} <= set(written["versions"])
    assert written["threads"]["requested"] == written["threads"]["torch"] == 1
    # In this process Numba is running already: its variable must stay as it was.
    expected_env = dict.fromkeys(cpu.THREAD_ENV_VARS, "1")
    expected_env["NUMBA_NUM_THREADS"] = numba_env_before
    assert written["threads"]["env"] == expected_env
    assert set(written["gemm_peak"]) == set(written["torch_path"]) == {"float32"}
    assert written["torch_path"]["float32"].startswith("oneDNN")

    expected = [(config.label, mode) for config in TINY for mode in cpu.MODES]
    rows = written["results"]
    assert [(row["label"], row["mode"]) for row in rows] == expected
    for row, config in zip(rows, [config for config in TINY for _ in cpu.MODES], strict=True):
        assert row["dtype"] == "float32"
        assert row["flops"] == config.flops(row["mode"])
        assert row["repeats"] >= 3
        for side in ("numlstm", "torch"):
            assert 0 < row[f"{side}_min_s"] <= row[f"{side}_s"]
            assert row[f"{side}_iqr_s"] >= 0
        assert row["ratio"] == pytest.approx(row["numlstm_s"] / row["torch_s"])
        for side in ("numlstm", "torch"):
            assert row[f"{side}_gflops"] == pytest.approx(row["flops"] / row[f"{side}_s"] / 1e9)
            peak = written["gemm_peak"]["float32"]["gflops"]
            assert row[f"{side}_peak_pct"] == pytest.approx(100 * row[f"{side}_gflops"] / peak)
        # At the peak, numlstm would take flops / peak seconds.
        assert row["ratio_at_peak"] == pytest.approx(row["flops"] / (peak * 1e9) / row["torch_s"])
        assert row["ratio_at_peak"] == pytest.approx(row["ratio"] * row["numlstm_peak_pct"] / 100)
    # Both sides computed the same thing (the same weights, input and output gradient).
    for record in written["parity"]:
        assert max(record["max_relative_difference"].values()) < cpu.PARITY_TOLERANCE["float32"]

    table = (tmp_path / "cpu.md").read_text().splitlines()
    warned = [line for line in table if line.startswith("**Warning: ")]
    assert len(warned) == len(written["busy_warnings"])
    table_rows = [line for line in table if line.startswith("| ")]
    assert table_rows[0] == "| " + " | ".join(cpu.COLUMNS) + " |"
    assert [line.split(" | ")[:3] for line in table_rows[1:]] == [
        [f"| {label}", "float32", mode] for label, mode in expected
    ]
    assert "| 5,2,3,4,2 | float32 | train |" in capsys.readouterr().out

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert not (tmp_path / "cpu.png").exists()
    else:
        assert (tmp_path / "cpu.png").read_bytes().startswith(b"\x89PNG")


def test_several_runs_write_every_run(tmp_path, restored_thread_env):
    argv = ["--configs", TINY[0].label, "--dtype", "float32", "--threads", "1", "--runs", "2"]
    argv += ["--min-time", "0.005", "--repeats", "3", "--gemm-size", "64", "--out", str(tmp_path)]
    report = cpu.main(argv)
    written = json.loads((tmp_path / "cpu.json").read_text())
    assert len(written["runs"]) == len(report["runs"]) == 2
    for row in written["results"]:
        ratios = [run["results"][written["results"].index(row)]["ratio"] for run in written["runs"]]
        assert row["ratio_min"] == min(ratios) and row["ratio_max"] == max(ratios)
    assert "Spread over the 2 runs" in (tmp_path / "cpu.md").read_text()


@pytest.mark.parametrize("cell", ["peephole", "ltm_stm"])
def test_a_cell_variant_is_timed_against_the_standard_cell(cell, tmp_path, restored_thread_env):
    argv = ["--configs", TINY[0].label, "--dtype", "float32", "--cell", cell]
    argv += ["--threads", "1", "--min-time", "0.005", "--repeats", "3"]
    argv += ["--gemm-size", "64", "--out", str(tmp_path)]
    report = cpu.main(argv)
    assert report["cell"] == cell
    assert report["baseline"] == "standard cell"
    assert [row["mode"] for row in report["results"]] == list(cpu.MODES)
    for row in report["results"]:
        assert (row["cell"], row["baseline"]) == (cell, "standard cell")
        assert row["ratio"] == pytest.approx(row["numlstm_s"] / row["torch_s"])
    # The two sides compute different cells: no parity to check.
    assert [record["max_relative_difference"] for record in report["parity"]] == [{}]
    table = (tmp_path / "cpu.md").read_text()
    assert f"numlstm runs cell='{cell}'" in table
    assert "| numlstm ms | standard cell ms | numlstm/standard cell |" in table


def test_the_models_of_a_cell_variant_share_the_standard_weights():
    ours, theirs, _, _ = cpu._models(TINY[0], "float32", "peephole")
    assert ours.cell == "peephole" and theirs.cell == "standard"
    shared = ours.state_dict()
    for name, value in theirs.state_dict().items():
        np.testing.assert_array_equal(value, shared[name])


def test_gradient_bench_times_both_ways_on_the_same_arrays(restored_thread_env, capsys):
    from bench import gradients

    result = gradients.measure((3, 5, 7, 9), "float64", repeats=1)
    assert result["by_gates_ms"] > 0 and result["packed_ms"] > 0
    assert result["partial_bytes"] == 4 * 9 * (7 + 9) * 8
    assert result["max_difference"] < 1e-13  # the same products, summed in another order
    gradients.main(["--shapes", "3,5,7,9", "--dtype", "float64"])
    assert "T,B,I,H = 3,5,7,9: partials" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        gradients.main(["--shapes", "3,5,7"])


def test_training_loop_bench_times_each_side_in_processes_of_its_own(capsys):
    from bench import training_loop

    training_loop.main(["--configs", "6,2,3,4", "--steps", "2", "--processes", "1"])
    header, rule, row = capsys.readouterr().out.strip().splitlines()
    assert header.startswith("| config (T,B,I,H) | pool ms") and rule.startswith("|---")
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[0] == "6,2,3,4" and len(cells) == 9
    # Times, faults and ratios of the pool, no pool and torch sides: all measured numbers.
    assert all(float(cell) >= 0 for cell in cells[1:])
    assert float(cells[1]) > 0 and float(cells[3]) > 0 and float(cells[6]) > 0
