"""The command line of a tiny run: a model of a few thousand weights, a few steps on the CPU, in float32."""

TINY_MODEL = ["--context-length", "16", "--emb-dim", "32", "--n-heads", "2", "--n-layers", "2"]
# a log line every step, no samples, float32 on the CPU, no progress bar
QUIET = ["--log-interval", "1", "--sample-tokens", "0", "--dtype", "float32", "--device", "cpu", "--no-progress"]
TINY_RUN = [*TINY_MODEL, "--batch-size", "4", "--max-steps", "4", "--eval-interval", "2", *QUIET]


def lines_of_text(path, count: int = 300):
    """A text file of `count` numbered lines."""
    path.write_text("".join(f"Line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(count)))
    return path
