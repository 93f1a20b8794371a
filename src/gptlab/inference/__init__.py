"""Inference: the KV-cached decoder, sampling, streaming."""
