"""Pretraining: run config, data, loop, parallelism, checkpoints."""
