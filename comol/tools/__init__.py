"""Command-line tools: sweeps listing and cost estimate, the report, the benchmarks."""
