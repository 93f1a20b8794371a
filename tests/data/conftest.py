import pytest

from gptlab.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def gpt2():
    return load_tokenizer("gpt2")
