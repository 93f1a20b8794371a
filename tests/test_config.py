"""GPTConfig: the presets' published shapes, JSON round-trip, and errors a person can act on."""

import dataclasses
import json

import pytest

from gptlab.config import PRESETS, GPTConfig, get_config

# (emb_dim, n_layers, n_heads) of the four GPT-2 sizes OpenAI released.
GPT2_SHAPES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
}
INT_FIELDS = ["vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"]


@pytest.mark.parametrize("name", GPT2_SHAPES)
def test_gpt2_presets_have_the_published_shapes(name):
    cfg = get_config(name)
    emb_dim, n_layers, n_heads = GPT2_SHAPES[name]
    assert (cfg.vocab_size, cfg.context_length) == (50257, 1024)
    assert (cfg.emb_dim, cfg.n_layers, cfg.n_heads) == (emb_dim, n_layers, n_heads)
    assert cfg.drop_rate == 0.1
    assert cfg.qkv_bias is False
    assert cfg.head_dim * cfg.n_heads == cfg.emb_dim


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_round_trips_through_json(name):
    cfg = PRESETS[name]
    text = cfg.to_json()
    assert json.loads(text) == dataclasses.asdict(cfg)
    assert GPTConfig.from_json(text) == cfg
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg


def test_get_config_applies_overrides_and_ignores_none():
    cfg = get_config("gpt2", n_layers=2, emb_dim=None)
    assert cfg.n_layers == 2 and cfg.emb_dim == 768
    assert PRESETS["gpt2"].n_layers == 12  # the preset itself is untouched


def test_get_config_rejects_an_unknown_name():
    with pytest.raises(ValueError, match="gpt3.*gpt2-medium"):
        get_config("gpt3")


def test_emb_dim_not_divisible_by_heads_says_what_to_do():
    with pytest.raises(ValueError) as error:
        GPTConfig(emb_dim=786, n_heads=12)
    message = str(error.value)
    for expected in ("786", "not divisible by", "12", "768"):
        assert expected in message


@pytest.mark.parametrize("field", INT_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_non_positive_sizes_are_rejected_by_name(field, value):
    with pytest.raises(ValueError, match=rf"{field} must be a positive integer, got {value}"):
        GPTConfig(**{field: value})


@pytest.mark.parametrize("drop_rate", [-0.1, 1.0])
def test_drop_rate_outside_zero_to_one_is_rejected(drop_rate):
    with pytest.raises(ValueError, match=rf"drop_rate must be in \[0, 1\), got {drop_rate}"):
        GPTConfig(drop_rate=drop_rate)


@pytest.mark.parametrize("rate", [-0.5, 1.0, True])
def test_attn_drop_rate_outside_zero_to_one_is_rejected(rate):
    with pytest.raises(ValueError, match=r"attn_drop_rate must be in \[0, 1\)"):
        GPTConfig(attn_drop_rate=rate)


def test_drop_rate_bounds_that_are_allowed():
    assert GPTConfig(drop_rate=0.0).drop_rate == 0.0
    assert GPTConfig(drop_rate=0.99).drop_rate == 0.99


def test_from_dict_rejects_an_unknown_field():
    data = get_config("gpt2").to_dict() | {"n_embd": 768}
    with pytest.raises(ValueError, match="unknown GPTConfig field.*n_embd"):
        GPTConfig.from_dict(data)


def test_replace_validates_too():
    with pytest.raises(ValueError, match="n_layers"):
        get_config("gpt2").replace(n_layers=0)
