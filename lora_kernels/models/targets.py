"""Which modules an adapter targets: PEFT's matching rules, and ``plan_targets``, the checks
``get_lora_model`` and ``load_adapter`` run before they change a model.

The rules follow ``peft.tuners.tuners_utils.check_target_module_exists`` and friends exactly
(see :mod:`lora_kernels.model` for the summary), so a config that targets a set of modules in
PEFT targets the same set here and PEFT checkpoints line up key for key.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..layers import BASE_ADAPTER, FusedLoraEmbedding, FusedLoraLinear
from ..layers.embedding import unsupported_embedding_options
from .config import LoraConfig, as_lora_config
from .modules_to_save import ModulesToSaveWrapper

__all__ = [
    "ALL_LINEAR",
    "DEFAULT_TARGETS",
    "TASK_HEADS",
    "Target",
    "candidate_modules",
    "is_target",
    "modules_to_save_names",
    "plan_targets",
    "resolve_targets",
]

ALL_LINEAR = "all-linear"

# PEFT's default targets when target_modules is None (peft.utils.constants), for the
# architectures people fine-tune most.
DEFAULT_TARGETS = {
    "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"],
    "mixtral": ["q_proj", "v_proj"],
    "qwen2": ["q_proj", "v_proj"],
    "qwen3": ["q_proj", "v_proj"],
    "gemma": ["q_proj", "v_proj"],
    "gemma2": ["q_proj", "v_proj"],
    "phi": ["q_proj", "v_proj", "fc1", "fc2"],
    "opt": ["q_proj", "v_proj"],
    "bart": ["q_proj", "v_proj"],
    "t5": ["q", "v"],
    "bert": ["query", "value"],
    "roberta": ["query", "value"],
    "xlm-roberta": ["query", "value"],
    "gpt2": ["c_attn"],
    "gpt_neox": ["query_key_value"],
    "falcon": ["query_key_value"],
}

# Heads that PEFT trains whole for these task types (PeftModelForSequenceClassification & co.).
TASK_HEADS = {
    "SEQ_CLS": ["classifier", "score"],
    "TOKEN_CLS": ["classifier", "score"],
    "QUESTION_ANS": ["qa_outputs"],
}


def _matches_names(spec: list[str] | str, key: str) -> bool:
    if isinstance(spec, str):
        return re.fullmatch(spec, key) is not None
    return key in spec or any(key.endswith("." + s) for s in spec)


def _in_layers(config: LoraConfig, key: str) -> bool:
    """PEFT's ``layers_to_transform`` rule: the first numbered segment is the layer index."""
    wanted = config.layers_to_transform
    if wanted is None or (isinstance(wanted, list) and not wanted):
        return True
    match = None
    if not config.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        patterns = config.layers_pattern
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match:
                break
    if match is None:
        return False
    index = int(match.group("idx"))
    return index == wanted if isinstance(wanted, int) else index in wanted


def is_target(config: LoraConfig, targets: list[str] | str, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` with ``targets`` resolved from the config."""
    if config.exclude_modules and _matches_names(config.exclude_modules, key):
        return False
    mts = modules_to_save_names(config)
    if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
        return False
    if not _matches_names(targets, key):
        return False
    return isinstance(targets, str) or _in_layers(config, key)


def modules_to_save_names(config: LoraConfig) -> list[str]:
    names = list(config.modules_to_save or [])
    for head in TASK_HEADS.get(config.task_type or "", []):
        if head not in names:
            names.append(head)
    return names


def _linear4bit_type():
    """bitsandbytes' ``Linear4bit``, when bitsandbytes is loaded (a model holding such layers has
    loaded it; otherwise there is nothing to find, and nothing is imported)."""
    bnb = sys.modules.get("bitsandbytes")
    return None if bnb is None else bnb.nn.Linear4bit


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``named_modules`` without the insides of our own wrappers (their lora_A/lora_B and copies
    are never targets, as in PEFT)."""
    skip: list[str] = []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in skip):
            continue
        if isinstance(module, (FusedLoraLinear, FusedLoraEmbedding, ModulesToSaveWrapper)):
            skip.append(name)
        yield name, module


def _output_head_names(model: nn.Module, config: LoraConfig) -> set[str]:
    """The layers ``"all-linear"`` leaves alone: a transformers model's output embedding, or its
    classifier for SEQ_CLS models (PEFT's ``_maybe_include_all_linear_layers``)."""
    heads: list[nn.Module] = []
    get_out = getattr(model, "get_output_embeddings", None)
    out = get_out() if callable(get_out) else None
    if out is not None:
        heads.append(out)
    elif config.task_type == "SEQ_CLS":
        for attr in ("score", "classifier"):
            if getattr(model, attr, None) is not None:
                heads.append(getattr(model, attr))
                break
    return {name for name, m in model.named_modules() if any(m is h for h in heads)}


def resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS and config.target_parameters:
            return []  # PEFT: parameter targets alone
        if model_type not in DEFAULT_TARGETS:
            raise ValueError(
                f"get_lora_model: config.target_modules is None and there is no default for "
                f"model type {model_type!r}; pass target_modules (names, a regex or 'all-linear')"
            )
        return list(DEFAULT_TARGETS[model_type])
    if isinstance(targets, str) and targets.lower() == ALL_LINEAR:
        conv1d = _conv1d_type()
        kinds = (nn.Linear,) if conv1d is None else (nn.Linear, conv1d)
        heads = _output_head_names(model, config)
        return sorted(
            name
            for name, m in candidate_modules(model)
            if isinstance(m, kinds) and name not in heads and name
        )
    return targets


@dataclass
class Target:
    name: str
    module: nn.Module
    r: int
    alpha: float
    kind: str = "linear"  # "linear", "conv1d" (fan_in_fan_out) or "embedding"
    in_features: int = 0  # PEFT's: A is [r, in_features], B [out_features, r]
    out_features: int = 0


def target_kind(module: nn.Module, conv1d, linear4bit) -> tuple[str, int, int] | None:
    """``(kind, in_features, out_features)`` of a module get_lora_model adapts, else None."""
    if isinstance(module, FusedLoraEmbedding) or type(module) is nn.Embedding:
        return "embedding", module.num_embeddings, module.embedding_dim
    if isinstance(module, FusedLoraLinear):
        kind = "conv1d" if module.fan_in_fan_out else "linear"
        return kind, module.in_features, module.out_features
    if type(module) is nn.Linear or (linear4bit is not None and isinstance(module, linear4bit)):
        return "linear", module.in_features, module.out_features  # Linear4bit: nn_4bit.py
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d", module.nx, module.nf
    return None


def plan_targets(
    model: nn.Module, config: LoraConfig, adapter_name: str, *, replacing: bool = False
):
    """Every check of ``get_lora_model``, before anything changes: ``(targets, resolved
    target_modules, modules_to_save names)``."""
    fn = "get_lora_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
    config = as_lora_config(fn, config)
    if not isinstance(adapter_name, str) or not adapter_name or "." in adapter_name:
        raise ValueError(
            f"{fn}: expected adapter_name to be a non-empty str without '.', got {adapter_name!r}"
        )
    if adapter_name == BASE_ADAPTER:
        raise ValueError(f"{fn}: {BASE_ADAPTER!r} is reserved for 'no adapter'")
    peft_layers = [n for n, m in model.named_modules() if type(m).__module__.startswith("peft.")]
    if peft_layers:
        raise TypeError(
            f"{fn}: the model already holds PEFT layers ({peft_layers[0]!r}, ...); run a PEFT "
            "model on our kernels with lora_kernels.integrations.peft.fuse instead"
        )
    existing = getattr(model, "lora_configs", {})
    if adapter_name in existing and not replacing:
        raise ValueError(
            f"{fn}: the model already has an adapter named {adapter_name!r} (it has "
            f"{list(existing)}); delete_adapter it first or pick another name"
        )
    merged = [
        name
        for name, layer in model.named_modules()
        if isinstance(layer, FusedLoraLinear) and layer.merged
    ]
    if merged:
        raise RuntimeError(f"{fn}: layers {merged[:3]} are merged; unmerge them first")
    targets = resolve_targets(model, config)
    conv1d = _conv1d_type()
    linear4bit = _linear4bit_type()
    found, unsupported = [], []
    for name, module in candidate_modules(model):
        if not name or not is_target(config, targets, name):
            continue
        kind = target_kind(module, conv1d, linear4bit)
        bad = unsupported_embedding_options(module) if kind and kind[0] == "embedding" else []
        if kind is not None and not bad:
            r, alpha = config.rank_and_alpha(name)
            found.append(Target(name, module, r, alpha, *kind))
        elif bad:
            unsupported.append(f"{name} (nn.Embedding with {', '.join(bad)})")
        else:
            unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise ValueError(
            f"{fn}: target_modules {targets!r} matches modules that get_lora_model cannot adapt "
            f"(nn.Linear, transformers Conv1D, nn.Embedding): {', '.join(unsupported)}. Narrow "
            "target_modules, or use PEFT with lora_kernels.integrations.peft.fuse, which leaves "
            "such layers on PEFT's code"
        )
    no_dora = [
        t.name
        for t in found
        if t.kind != "linear" or hasattr(getattr(t.module, "weight", None), "quant_state")
    ]
    if config.use_dora and no_dora:
        raise ValueError(
            f"{fn}: use_dora=True is supported on nn.Linear targets; these targets are Conv1D, "
            f"embedding or 4-bit layers: {no_dora[:8]}. Narrow target_modules, or use PEFT with "
            "lora_kernels.integrations.peft.fuse"
        )
    if not found and not config.target_parameters:
        raise ValueError(
            f"{fn}: target_modules {targets!r} matches no nn.Linear (nor Conv1D, nn.Embedding) "
            "of the model "
            f"(exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r})"
        )
    mts_names = []
    wanted = modules_to_save_names(config)
    if wanted:
        targeted = {t.name for t in found}
        for name, module in candidate_modules(model):
            if not name or not any(name.endswith(m) for m in wanted):
                continue
            if name in targeted or any(name.startswith(t + ".") for t in targeted):
                raise ValueError(
                    f"{fn}: module {name!r} is both a LoRA target and a module to save"
                )
            if any(name.startswith(p + ".") for p in mts_names):
                continue
            if not isinstance(module, ModulesToSaveWrapper) and any(
                isinstance(m, (FusedLoraLinear, FusedLoraEmbedding, ModulesToSaveWrapper))
                for m in module.modules()
            ):
                raise ValueError(
                    f"{fn}: modules_to_save entry matches {name!r}, which holds LoRA layers"
                )
            mts_names.append(name)
    return found, targets, mts_names
