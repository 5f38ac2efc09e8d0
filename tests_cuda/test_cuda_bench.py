"""``bench/gpu_bench.py`` runs end to end on a tiny grid (``--smoke``) and writes its results.

In the simulator torch runs on the CPU and numlstm on simulated device arrays; on a GPU both
run on the device. The full benchmark runs only from ``bench/gpu``.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "gpu_bench.py"


def load_bench():
    spec = importlib.util.spec_from_file_location("gpu_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_bench_smoke_writes_every_configuration(tmp_path, capsys):
    pytest.importorskip("torch", reason="the benchmark compares with torch.nn.LSTM")
    bench = load_bench()
    assert bench.main(["--smoke", "--out", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    grid = bench.SMOKE
    assert [(r["batch"], r["hidden"]) for r in results["rows"]] == [
        (b, h) for h in grid["hiddens"] for b in grid["batches"]
    ]
    for row in results["rows"]:
        for name in ("forward", "forward+backward"):
            timing = row[name]
            assert timing["numlstm_ms"] > 0 and timing["torch_ms"] > 0
            assert timing["repeats"] == grid["max_repeats"]
            # Same weights, same input: the outputs agree (float32; cuDNN may use TF32).
            assert timing["max_abs_output_difference"] < 1e-2
    table = (tmp_path / "results.md").read_text()
    assert table.count("\n| ") == 1 + len(results["rows"])  # header and one line per row
    assert "ratio" in capsys.readouterr().out
