"""Training: the per-worker loop, optimizer and schedule, precision, checkpoints (one owner module each)."""
