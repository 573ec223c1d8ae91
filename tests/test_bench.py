"""The stage-2 benchmark's own switches (its timings are not tested)."""
import importlib.util
import json
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_stage2.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_stage2", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_memory_steps_none_skips_the_memory_children(tmp_path, monkeypatch):
    bench = _bench()
    children = []
    monkeypatch.setattr(bench, "peak_memory_mb", lambda args, steps: children.append(steps) or {"peak_mb": 1.0})
    args = ["--image_size", "16", "--bs", "20", "--adaptation_steps", "1", "--loops", "1", "--device", "cpu"]
    assert bench.main(args + ["--memory_steps", "none", "--out", str(tmp_path / "a.json")]) == 0
    assert children == [] and json.loads((tmp_path / "a.json").read_text())["peak_memory_mb"] == {}
    assert bench.main(args + ["--memory_steps", "1,2", "--out", str(tmp_path / "b.json")]) == 0
    assert children == [1, 2] and json.loads((tmp_path / "b.json").read_text())["peak_memory_mb"] == {"1": 1.0, "2": 1.0}
