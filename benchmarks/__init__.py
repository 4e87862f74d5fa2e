"""stoppoint benchmarks: run with `python -m benchmarks` (add `--quick` for a smoke run)."""
