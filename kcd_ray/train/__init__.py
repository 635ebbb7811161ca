"""Ray Train adapters: the per-worker loop, checkpoints, metrics and the E-step/M-step glue."""
