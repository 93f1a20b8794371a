"""Helpers shared by the data tests."""


class CountingTokenizer:
    """A tokenizer that counts encode_batch calls, to see whether a build tokenized anything."""

    def __init__(self, tokenizer):
        self.tokenizer, self.calls = tokenizer, 0
        self.vocab_size, self.eot_id = tokenizer.vocab_size, tokenizer.eot_id

    def encode_batch(self, texts):
        self.calls += 1
        return self.tokenizer.encode_batch(texts)

    def decode_bytes(self, ids):
        return self.tokenizer.decode_bytes(ids)

    def spec(self):
        return self.tokenizer.spec()


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode("utf-8") if isinstance(text, str) else text)
    return path
