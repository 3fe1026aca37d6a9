"""Long-run safety for training: resumable checkpoints, signal handling, divergence guard (docs/long_runs.md)."""
