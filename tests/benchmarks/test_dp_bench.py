"""benchmarks.dp: the DP/non-DP ratios from its rows (the measurement itself is smoke-run by
hand: it compiles two T5 train steps per method)."""

import pytest

from benchmarks.dp import ratios


def test_ratios_pair_dp_with_non_dp_per_method():
    rows = [
        {"method": "lora", "mode": "non_dp", "step_time_s": 0.5, "peak_memory_mb": 100.0},
        {"method": "lora", "mode": "dp", "step_time_s": 1.5, "peak_memory_mb": 250.0},
        {"method": "compacter++", "mode": "non_dp", "step_time_s": 0.4, "peak_memory_mb": None},
        {"method": "compacter++", "mode": "dp", "step_time_s": 0.6, "peak_memory_mb": 90.0},
        {"method": "bitfit", "mode": "non_dp", "step_time_s": 0.4, "peak_memory_mb": 1.0},
        {"method": "bitfit", "mode": "dp", "error": "exit 1"},
    ]
    out = ratios(rows)
    assert out["lora"] == {"step_time": pytest.approx(3.0), "peak_memory": pytest.approx(2.5)}
    assert out["compacter++"] == {"step_time": pytest.approx(1.5), "peak_memory": None}
    assert "bitfit" not in out  # a failed measurement gives no ratio
