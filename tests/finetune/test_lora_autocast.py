"""LoRA under bfloat16 autocast, as fine-tuning trains it: an adapted layer casts its input once for the
base product and the update, so the loss and every adapter's gradient (the first block's too, reached
through the casts of every layer above it) must be float32's within bfloat16's precision, on a float32
base and on a bfloat16 one (--lora-base-dtype bfloat16). The float32 path is the reference: test_lora.py
checks it against the explicit formula."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import random_model

from gptlab.config import GPTConfig
from gptlab.finetune.hooks import lower_frozen
from gptlab.finetune.lora import LoRAConfig, apply_lora, lora_modules

CONFIG = GPTConfig(vocab_size=50, context_length=16, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True)


def loss_and_adapter_grads(model, tokens, autocast: bool):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
    loss.backward()
    return loss.item(), {
        f"{name}.{part}": getattr(module, part).grad
        for name, module in lora_modules(model).items()
        for part in ("lora_A", "lora_B")
    }


@pytest.mark.parametrize("base_dtype", ["float32", "bfloat16"])
def test_autocast_loss_and_adapter_gradients_match_float32(base_dtype):
    reference = apply_lora(random_model(CONFIG, noise=0.1), LoRAConfig(rank=4, alpha=8))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero, which would leave every A without a gradient
        for module in lora_modules(reference).values():
            module.lora_B.normal_(0, 0.2)
    model = copy.deepcopy(reference)
    lower_frozen(model, base_dtype)
    tokens = torch.randint(0, CONFIG.vocab_size, (4, 13), generator=torch.Generator().manual_seed(2))

    expected_loss, expected = loss_and_adapter_grads(reference.train(), tokens, autocast=False)
    loss, grads = loss_and_adapter_grads(model.train(), tokens, autocast=True)

    assert loss == pytest.approx(expected_loss, rel=1e-2)
    assert grads.keys() == expected.keys() and len(grads) == 4 * 2 * CONFIG.n_layers
    for name, grad in grads.items():
        assert grad is not None and grad.dtype == torch.float32, name
        error = (grad - expected[name]).norm() / expected[name].norm()
        assert error < 0.05, f"{name}: relative error {error:.3f}"  # bfloat16 keeps 8 bits of each product
