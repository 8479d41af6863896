"""Benchmarks: `python -m benchmarks.efficiency` (PEFT efficiency table, see
docs/benchmarks.md) and `python -m benchmarks.phm_paths` (PHM matmul paths)."""
