"""Model builders and comparisons shared by the model, checkpoint, switching, integration and
ecosystem tests. transformers and PEFT are imported where they are used, by
``pytest.importorskip``: a test that builds a PEFT model skips without PEFT, and the rest of its
module still runs."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lora_kernels.layers.linear import FusedLoraLinear
from tests.tolerances import assert_close_to_ref


class TinyBlocks(nn.Module):
    """Two residual blocks of three linears (``q``, ``up``, ``down``) and a head; rows never mix
    (so a mixed-adapter batch equals each adapter run alone, row for row)."""

    def __init__(self, dim: int = 24, hidden: int = 40):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.ModuleDict(
                {
                    "q": nn.Linear(dim, dim),
                    "up": nn.Linear(dim, hidden),
                    "down": nn.Linear(hidden, dim),
                }
            )
            for _ in range(2)
        )
        self.head = nn.Linear(dim, 10)

    def forward(self, x):
        for block in self.blocks:
            h = block["q"](x)
            x = x + block["down"](torch.relu(block["up"](h)))
        return self.head(x)


def tiny_llama(seed: int = 0, layers: int = 2) -> nn.Module:
    """A LlamaForCausalLM small enough for the CPU: hidden 32, 2 layers, untied head."""
    transformers = pytest.importorskip("transformers")

    cfg = transformers.LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=44,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def tiny_bert_classifier(seed: int = 0) -> nn.Module:
    """A BertForSequenceClassification with biases everywhere and a ``classifier`` head."""
    transformers = pytest.importorskip("transformers")

    cfg = transformers.BertConfig(
        vocab_size=50,
        hidden_size=24,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=40,
        max_position_embeddings=32,
        num_labels=3,
    )
    torch.manual_seed(seed)
    return transformers.BertForSequenceClassification(cfg).eval()


def token_ids(vocab: int = 61, shape=(2, 7)) -> torch.Tensor:
    return torch.randint(0, vocab, shape)


def randomise(model: nn.Module) -> None:
    """Give every LoRA weight (ours or PEFT's) a non-zero value, so adapters change outputs."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_A." in name or ".lora_B." in name:
                p.normal_(0, 0.2)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def assert_same_model_output(name, ours, peft_model, ids):
    """Ours (fp32) against PEFT run in fp64, with PEFT fp32 as the same-precision baseline."""
    ref64 = logits(copy.deepcopy(peft_model).double(), ids).double()
    assert_close_to_ref(name, logits(ours, ids), ref64, logits(peft_model, ids))


def lora_names_of(model: nn.Module) -> set[str]:
    """The adapted module names of our model or a PEFT model (PEFT's prefix removed)."""
    names = set()
    for name, module in model.named_modules():
        if (
            isinstance(module, FusedLoraLinear)
            or type(module).__name__ == "Linear"
            and hasattr(module, "lora_A")
        ):
            names.add(name.removeprefix("base_model.model."))
    return names


def peft_model_of(base: nn.Module, **kwargs):
    """A PEFT LoRA model of a copy of ``base`` (``kwargs``: PEFT's LoraConfig)."""
    peft = pytest.importorskip("peft")

    return peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**kwargs))
