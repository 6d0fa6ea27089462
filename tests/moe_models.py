"""Tiny transformers 5 mixture-of-experts models built from configs (no download), shared by the
MoE model tests and benchmarks."""

from __future__ import annotations

import torch

EXPERT_TARGETS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]


def tiny_moe_model(kind: str, seed: int = 0) -> torch.nn.Module:
    """A 2-layer causal LM of family ``kind`` ("qwen3_moe", "mixtral", "olmoe", "gpt_oss"),
    fp32, random weights, eval mode."""
    import transformers as tf

    common = dict(
        vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    if kind == "qwen3_moe":
        cfg = tf.Qwen3MoeConfig(
            **common, intermediate_size=48, moe_intermediate_size=24, num_experts=6,
            num_experts_per_tok=2, decoder_sparse_step=1, head_dim=8,
        )  # fmt: skip
        cls = tf.Qwen3MoeForCausalLM
    elif kind == "mixtral":
        cfg = tf.MixtralConfig(**common, intermediate_size=24, num_local_experts=5,
                               num_experts_per_tok=2)  # fmt: skip
        cls = tf.MixtralForCausalLM
    elif kind == "olmoe":
        cfg = tf.OlmoeConfig(
            **common, intermediate_size=24, num_experts=6, num_experts_per_tok=2,
            eos_token_id=1, pad_token_id=0, bos_token_id=None,
        )  # fmt: skip
        cls = tf.OlmoeForCausalLM
    elif kind == "gpt_oss":
        cfg = tf.GptOssConfig(
            **common, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
            head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"],
        )  # fmt: skip
        cls = tf.GptOssForCausalLM
    else:
        raise ValueError(kind)
    torch.manual_seed(seed)
    model = cls(cfg)
    with torch.no_grad():  # experts weights big enough that the LoRA terms and clamps matter
        for name, p in model.named_parameters():
            if "experts" in name:
                p.normal_(0.0, 0.2)
    return model.eval()
