"""Pretraining and fine-tuning loops, their configuration and their checkpoints."""
