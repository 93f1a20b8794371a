"""The decoding session: weights prepared once per model (and again only when they change), the model's
own weights where asked, and the static cache of the compiled step against the ordinary one."""

from __future__ import annotations

import gc
import threading
import weakref
from copy import deepcopy as copy_module

import pytest
import torch
from generation_helpers import SHAPES, one_thread, random_model, random_prompts

from gptlab.config import GPTConfig
from gptlab.inference import decoder as decoder_module
from gptlab.inference.cache import KVCache
from gptlab.inference.decoder import (
    Decoder,
    DecoderSettings,
    cache_dtype,
    next_token_logits,
)
from gptlab.inference.generate import (
    GenerationOptions,
    generate,
    generate_ids,
    generate_uncached,
)
from gptlab.inference.kernels import decoding_linear, kernel_for
from gptlab.inference.quantize import quantize_model

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


def takes_the_chosen_kernels(model, copy, dtype) -> bool:
    """Whether each Linear of the decoding copy is the kind of module kernel_for(dtype) makes."""
    return all(
        type(copy.get_submodule(name)) is type(decoding_linear(copy_module(plain).to(dtype), kernel_for(dtype)))
        for name, plain in model.named_modules()
        if isinstance(plain, torch.nn.Linear)
    )


def test_cpu_weights_are_prepared_once_per_model_with_the_chosen_kernels_and_share_what_they_can():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prepared = Decoder(model, 1).model
    qkv = prepared.trf_blocks[0].att.qkv
    assert takes_the_chosen_kernels(model, prepared, torch.float32)
    x = torch.randn(2, 3, cfg.emb_dim)
    reference = model.trf_blocks[0].att.qkv(x)
    assert torch.allclose(qkv(x), reference, rtol=0, atol=1e-5)  # the same product, from the prepared weight
    assert torch.allclose(prepared.out_head(x), model.out_head(x), rtol=0, atol=1e-5)
    assert prepared.tok_emb.weight.data_ptr() == model.tok_emb.weight.data_ptr()  # shared, not copied
    assert Decoder(model, 4).model is prepared  # the next session reuses it
    generate_ids(model, [[1, 2]], GenerationOptions(max_new_tokens=3))
    assert Decoder(model, 1).model is prepared

    bf16 = Decoder(model, 1, DecoderSettings(dtype=torch.bfloat16)).model
    assert takes_the_chosen_kernels(model, bf16, torch.bfloat16)
    assert torch.allclose(bf16.trf_blocks[0].att.qkv(x.bfloat16()).float(), reference, rtol=0, atol=0.05)
    assert Decoder(model, 1, DecoderSettings(dtype=torch.bfloat16)).model is bf16
    assert Decoder(model, 1).model is prepared  # one kept per dtype


@pytest.mark.parametrize("change", ["optimizer step", "load_state_dict", "replaced parameter"])
def test_a_changed_model_gets_a_fresh_layout(change):
    cfg = SHAPES["untied, no bias"]
    model = random_model(cfg)
    prompt = random_prompts(cfg, [5])
    greedy = GenerationOptions(max_new_tokens=8, temperature=0)
    stale = weakref.ref(Decoder(model, 1).model)
    if change == "optimizer step":
        optimizer = torch.optim.SGD(model.parameters(), lr=10.0)
        model(torch.tensor(prompt)).logsumexp(-1).mean().backward()
        optimizer.step()
    elif change == "load_state_dict":
        model.load_state_dict(random_model(cfg, seed=7).state_dict())
    else:
        model.out_head.weight = torch.nn.Parameter(torch.randn_like(model.out_head.weight))
    fresh = Decoder(model, 1).model
    gc.collect()
    assert stale() is None  # the stale copy was let go, not kept beside the fresh one
    features = torch.randn(1, cfg.emb_dim)
    assert torch.allclose(fresh.out_head(features), model.out_head(features), rtol=0, atol=1e-5)  # the new weights
    expected = generate_uncached(model, torch.tensor(prompt), 8)[0, 5:].tolist()
    assert generate_ids(model, prompt, greedy) == [expected]


def test_the_layout_goes_with_the_model():
    model = random_model(SHAPES["tied, qkv bias"])
    prepared = weakref.ref(Decoder(model, 1).model)
    del model
    gc.collect()
    assert prepared() is None


def test_weights_made_under_inference_mode_are_laid_out_per_session():
    """Their in-place changes cannot be seen (no version counter), so no copy is kept for them."""
    with torch.inference_mode():
        model = random_model(SHAPES["tied, qkv bias"])
    first = Decoder(model, 1).model
    assert first is not model and Decoder(model, 1).model is not first


def test_own_weights_without_copies_and_never_in_training_mode():
    """prepare_weights=False (the trainer's samples) decodes with the model's tensors; a model in training
    mode decodes as in eval mode (no dropout) and keeps its mode."""
    cfg = GPTConfig(vocab_size=61, context_length=24, emb_dim=48, n_heads=3, n_layers=2, drop_rate=0.5)
    model = random_model(cfg)
    own = DecoderSettings(prepare_weights=False)
    assert Decoder(model, 1, own).model is model
    prompts = random_prompts(cfg, [4, 6])
    greedy = GenerationOptions(max_new_tokens=10, temperature=0)
    expected = generate_ids(model, prompts, greedy)
    model.train()
    view = Decoder(model, 1, own).model
    assert not view.training and model.training
    assert all(view.state_dict()[name].data_ptr() == tensor.data_ptr() for name, tensor in model.state_dict().items())
    assert generate_ids(model, prompts, greedy, settings=own) == expected
    assert generate_ids(model, prompts, greedy) == expected
    assert model.training


def test_a_quantized_model_decodes_as_it_is():
    """No float copy can be made of integer weights: the default settings use the model itself."""
    cfg = GPTConfig(vocab_size=64, context_length=16, emb_dim=64, n_heads=2, n_layers=1)
    quantized = quantize_model(random_model(cfg), "int8")
    assert Decoder(quantized, 1).model is quantized
    ids = torch.tensor(random_prompts(cfg, [3]))
    own = generate_ids(
        quantized,
        ids.tolist(),
        GenerationOptions(max_new_tokens=6, temperature=0),
        settings=DecoderSettings(prepare_weights=False),
    )
    assert generate(quantized, ids, 6)[:, 3:].tolist() == own
    with pytest.raises(ValueError, match="a quantized model decodes in the dtype it was quantized in"):
        Decoder(quantized, 1, DecoderSettings(dtype=torch.bfloat16))


@torch.inference_mode()
def test_bfloat16_decoding_stays_close_to_float32():
    """The prefill and one-token steps (one-row products, a float32 cache on the CPU)."""
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompt = random_prompts(cfg, [6])[0]
    fp32_session, bf16_session = Decoder(model, 1), Decoder(model, 1, DecoderSettings(dtype=torch.bfloat16))
    assert bf16_session.cache.layers[0].keys.dtype == torch.float32 == cache_dtype(torch.bfloat16, torch.device("cpu"))
    fp32, bf16 = fp32_session.prefill([prompt]), bf16_session.prefill([prompt])
    for _ in range(8):
        assert bf16.dtype == torch.float32
        assert (fp32 - bf16).abs().max() < 0.05 * fp32.abs().max()
        next_ids = fp32.argmax(-1)  # (1,)
        fp32, bf16 = fp32_session.step(next_ids), bf16_session.step(next_ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_prepared_layer_serves_every_row_count(dtype):
    """A row's product is the same bits alone as in a batch of any size (each kernel's own test is in
    test_kernels.py), and the float32 product of the dtype's weights to that dtype's rounding."""
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    qkv = Decoder(model, 1, DecoderSettings(dtype=dtype)).model.trf_blocks[0].att.qkv
    x = torch.randn(9, cfg.emb_dim).to(dtype)
    batch = qkv(x)
    plain = model.trf_blocks[0].att.qkv
    expected = torch.nn.functional.linear(x.float(), plain.weight.to(dtype).float(), plain.bias.to(dtype).float())
    assert torch.allclose(batch.float(), expected, rtol=2**-7 if dtype == torch.bfloat16 else 1e-5, atol=1e-3)
    for rows in (1, 2, 3, 8):
        assert torch.equal(qkv(x[:rows]), batch[:rows])
    assert torch.equal(qkv(x[None, 4:7]), batch[None, 4:7])  # (B, T, C) as a prefill passes it


def test_a_bfloat16_decode_leaves_the_process_alone():
    """While one thread decodes in bfloat16, another sees oneDNN enabled at every look: nothing outside the
    decode call is switched."""
    model = random_model(SHAPES["tied, qkv bias"])
    looks, done = [], threading.Event()

    def look():
        while not done.is_set():
            looks.append(torch.backends.mkldnn.enabled)

    watcher = threading.Thread(target=look)
    watcher.start()
    try:
        for _ in range(3):
            generate_ids(model, [[1, 2, 3]], GenerationOptions(max_new_tokens=8), DecoderSettings(dtype=torch.bfloat16))
    finally:
        done.set()
        watcher.join()
    assert looks and all(looks)


def test_threads_asking_at_once_share_one_prepared_copy(monkeypatch):
    model = random_model(SHAPES["tied, qkv bias"])
    made, start = [], threading.Barrier(4)
    real = decoder_module.decoding_model
    monkeypatch.setattr(decoder_module, "decoding_model", lambda *args: made.append(args) or real(*args))
    copies = []

    def ask():
        start.wait()
        copies.append(decoder_module.prepared_model(model, torch.float32))

    threads = [threading.Thread(target=ask) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(made) == 1 and len(copies) == 4 and all(copy is copies[0] for copy in copies)


@torch.inference_mode()
def test_static_cache_gives_the_ordinary_caches_logits():
    """Left-padded rows, a prefill and 20 one-token steps: attending over every slot behind a mask equals
    attending over the filled slots."""
    cfg = SHAPES["untied, no bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [1, 3, 4])
    padded = torch.tensor([[0] * (4 - len(p)) + p for p in prompts])  # (3, 4)
    padding = torch.tensor([4 - len(p) for p in prompts])
    ordinary, static = KVCache(cfg, 3), KVCache(cfg, 3, static=True)
    ordinary.reset(padding)
    static.reset(padding)
    ids = padded
    for _ in range(20):
        expected = next_token_logits(model, ids, ordinary)
        assert (next_token_logits(model, ids, static) - expected).abs().max() <= 1e-5
        ids = expected.argmax(-1, keepdim=True)  # (3, 1)


def test_compiled_session_logic_equals_the_ordinary_one(monkeypatch):
    """Decoder(compile=True) with the compiler swapped for the eager function: the static cache, the
    sliding window and padded batches of the compiled session, checked on the CPU."""
    monkeypatch.setattr(decoder_module, "compiled_next_token_logits", lambda: next_token_logits)
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg)
    prompts = random_prompts(cfg, [2, 9, 5])
    for options in (
        GenerationOptions(max_new_tokens=3 * cfg.context_length, temperature=0),
        GenerationOptions(max_new_tokens=40, temperature=1.0, top_k=20, seed=5, num_samples=2),
    ):
        expected = generate_ids(model, prompts, options)
        assert generate_ids(model, prompts, options, settings=DecoderSettings(compile=True)) == expected


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the compiled step is recorded as a CUDA graph")
def test_compiled_cuda_step_gives_the_eager_tokens():
    cfg = SHAPES["tied, qkv bias"]
    model = random_model(cfg).cuda()
    prompts = random_prompts(cfg, [2, 9, 5])
    for options in (
        GenerationOptions(max_new_tokens=3 * cfg.context_length, temperature=0),
        GenerationOptions(max_new_tokens=40, temperature=1.0, top_k=20, seed=5, num_samples=2),
    ):
        expected = generate_ids(model, prompts, options)
        assert generate_ids(model, prompts, options, settings=DecoderSettings(compile=True)) == expected
