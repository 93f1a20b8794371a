"""Formats other tools read and write: Hugging Face GPT-2 folders."""
