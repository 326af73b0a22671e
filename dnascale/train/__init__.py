"""Pretraining: DeepSpeed engine, loop, checkpoints, metrics and logging."""
