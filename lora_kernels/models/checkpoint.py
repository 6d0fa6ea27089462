"""Adapters on disk in PEFT's layout.

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` (the ``LoraConfig`` fields,
``peft_type: "LORA"``) and ``adapter_model.safetensors`` (or the older ``adapter_model.bin``)
whose keys are ``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and
``.lora_B.weight`` (``[out, r]``), without the adapter's name: the name is chosen when loading.
An adapted embedding has ``.lora_embedding_A`` (``[r, num_embeddings]``) and
``.lora_embedding_B`` (``[embedding_dim, r]``) instead. When the targets include a module named
``embed_tokens`` or ``lm_head``, PEFT also writes the adapted input and output embeddings' tables
(``.base_layer.weight``, for vocabularies resized while training) and loads them back; so do we.
DoRA adapters (``use_dora``) add ``<module path>.lora_magnitude_vector`` (``[out]``: PEFT saves it
without the ``.weight`` its in-memory state_dict has).
"""

from __future__ import annotations

import json
import os
import re

import torch
from torch import nn

from .._checks import fmt_shape
from ..layers import FusedLoraEmbedding, FusedLoraExperts
from .config import LoraConfig
from .experts import expert_key_prefixes, expert_layers, plan_expert_targets
from .model import get_lora_model, lora_layers, set_adapter
from .modules_to_save import ModulesToSaveWrapper
from .targets import plan_targets

__all__ = ["load_adapter", "read_peft_adapter", "save_adapter", "split_peft_key"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# "<module path>.lora_A.weight", or "<module path>.lora_A.<adapter name>.weight" as PEFT's
# in-memory state_dict spells it (adapter names hold no ".", PEFT and FusedLoraLinear agree);
# embeddings: "<module path>.lora_embedding_A" or "<module path>.lora_embedding_A.<adapter>".
_LORA_KEY = re.compile(
    r"^(?P<module>.+)\.(?:(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight"
    r"|(?P<emb>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?)$"
)
# PEFT writes the tables of adapted input/output embeddings when a target is named so.
EMBEDDING_LAYER_NAMES = ("embed_tokens", "lm_head")
# DoRA's magnitude: "<module>.lora_magnitude_vector" on disk, "....<adapter>.weight" in memory.
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:(?:\.[^.]+)?\.weight)?$")


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: ``(config dict, {file key: tensor})`` on the CPU.

    ``path`` holds ``adapter_config.json`` and ``adapter_model.safetensors``, or
    ``adapter_model.bin`` when there is no safetensors file. The keys are returned as stored.
    """
    fn = "read_peft_adapter"
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fn}: expected path to be an adapter directory, got {path!r}")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{fn}: {path!r} has no {CONFIG_NAME}")
    with open(config_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{fn}: {config_file!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{fn}: expected {config_file!r} to hold a JSON object, got {type(config).__name__}"
        )
    st_file = os.path.join(path, SAFETENSORS_NAME)
    bin_file = os.path.join(path, BIN_NAME)
    if os.path.isfile(st_file):
        from safetensors.torch import load_file

        tensors = load_file(st_file, device="cpu")
    elif os.path.isfile(bin_file):
        tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{fn}: {path!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")
    return config, dict(tensors)


def split_peft_key(key: str) -> tuple[str, str]:
    """``"base_model.model.a.b.lora_A.weight"`` -> ``("a.b", "lora_A")``.

    Also accepts the key without the ``base_model.model.`` prefix and with an adapter name before
    ``weight`` (``"a.b.lora_B.default.weight"``), and an embedding's
    ``"a.lora_embedding_A[.<adapter>]"`` -> ``("a", "lora_embedding_A")``. Anything else raises
    ``ValueError``.
    """
    m = _LORA_KEY.match(key.removeprefix(KEY_PREFIX)) if isinstance(key, str) else None
    if m is None:
        raise ValueError(
            f"split_peft_key: expected a key like 'base_model.model.<module>.lora_A.weight' "
            f"or '<module>.lora_B.<adapter>.weight', got {key!r}"
        )
    return m.group("module"), m.group("part") or m.group("emb")


# --------------------------------------------------------------------------------------------
# save / load
# --------------------------------------------------------------------------------------------


def _bias_keys(model: nn.Module, lora_names: set[str], mts_names: list[str]) -> dict[str, str]:
    """PEFT key -> our state_dict key of every bias that ``bias="all"`` saves.

    PEFT keeps a targeted layer's bias under ``<layer>.base_layer.bias``; ours is
    ``<layer>.bias``. The biases of modules_to_save travel with those modules instead.
    """
    out = {}
    for key in model.state_dict():
        if not key.endswith(".bias") or any(key.startswith(m + ".") for m in mts_names):
            continue
        module = key[: -len(".bias")]
        peft = f"{module}.base_layer.bias" if module in lora_names else key
        out[KEY_PREFIX + peft] = key
    return out


def _saved_modules(model: nn.Module, mts_names: list[str]) -> dict[str, nn.Module]:
    out = {}
    for name in mts_names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module = module.original_module
        out[name] = module
    return out


def save_adapter(model: nn.Module, path: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write adapter ``adapter_name`` of ``model`` to directory ``path`` in PEFT's layout.

    ``adapter_config.json`` holds the adapter's ``LoraConfig`` with every field PEFT writes
    (``peft_type: "LORA"``, ``inference_mode: true``); ``adapter_model.safetensors`` holds
    ``base_model.model.<layer>.lora_A.weight`` ``[r, in]`` and ``.lora_B.weight`` ``[out, r]`` for
    each adapted layer, the trained biases (``bias`` "all" / "lora_only") and the adapter's copy of
    each module to save, keyed as PEFT keys them. ``PeftModel.from_pretrained`` reads it.
    """
    fn = "save_adapter"
    configs = getattr(model, "lora_configs", None) or {}
    if adapter_name not in configs:
        raise ValueError(
            f"{fn}: the model has no adapter {adapter_name!r} (it has {list(configs)})"
        )
    config = configs[adapter_name]
    tensors: dict[str, torch.Tensor] = {}
    lora_names = set()
    for name, layer in lora_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        lora_names.add(name)
        if isinstance(layer, FusedLoraEmbedding):
            tensors[f"{KEY_PREFIX}{name}.lora_embedding_A"] = layer.lora_embedding_A[adapter_name]
            tensors[f"{KEY_PREFIX}{name}.lora_embedding_B"] = layer.lora_embedding_B[adapter_name]
            continue
        tensors[f"{KEY_PREFIX}{name}.lora_A.weight"] = layer.lora_A[adapter_name].weight
        tensors[f"{KEY_PREFIX}{name}.lora_B.weight"] = layer.lora_B[adapter_name].weight
        if adapter_name in layer.lora_magnitude_vector:
            magnitude = layer.lora_magnitude_vector[adapter_name].weight
            tensors[f"{KEY_PREFIX}{name}.lora_magnitude_vector"] = magnitude
        if config.bias == "lora_only" and layer.bias is not None:
            tensors[f"{KEY_PREFIX}{name}.base_layer.bias"] = layer.bias
    for name, layer in expert_layers(model):
        if adapter_name not in layer.adapter_names:
            continue
        for param, depth in expert_key_prefixes(layer.adapter_params(adapter_name)).items():
            for part in ("lora_A", "lora_B"):
                weight = getattr(layer, part)[param][adapter_name].weight
                tensors[f"{KEY_PREFIX}{name}.{depth}{part}.weight"] = weight
    for name in _saved_tables(model, config, lora_names):
        tensors[f"{KEY_PREFIX}{name}.base_layer.weight"] = model.get_submodule(name).weight
    mts_names = [
        name
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    ]
    if config.bias == "all":
        state = model.state_dict(keep_vars=True)
        for peft_key, key in _bias_keys(model, lora_names, mts_names).items():
            tensors[peft_key] = state[key]
    for name in mts_names:
        copy = model.get_submodule(name).modules_to_save[adapter_name]
        for key, value in copy.state_dict(keep_vars=True).items():
            tensors[f"{KEY_PREFIX}{name}.{key}"] = value
    # safetensors refuses tensors that share storage (tied weights): write independent copies.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    config_dict = config.to_dict()
    config_dict["inference_mode"] = True
    if config_dict.get("base_model_name_or_path") is None:
        config_dict["base_model_name_or_path"] = (
            getattr(getattr(model, "config", None), "name_or_path", None) or None
        )
    path = os.fspath(path)
    os.makedirs(path, exist_ok=True)
    from safetensors.torch import save_file

    save_file(tensors, os.path.join(path, SAFETENSORS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, CONFIG_NAME), "w", encoding="utf-8") as f:
        json.dump(config_dict, f, indent=2, sort_keys=True)
        f.write("\n")


def _embedding_targeted(config: LoraConfig, lora_names) -> bool:
    """PEFT's ``embedding_is_targeted``: a target named like an input/output embedding."""
    return any(
        re.match(rf"(.*\.)?{e}$", name) for name in lora_names for e in EMBEDDING_LAYER_NAMES
    )


def _saved_tables(model: nn.Module, config: LoraConfig, lora_names) -> list[str]:
    """The adapted input/output embeddings whose tables PEFT's save writes (its
    ``save_embedding_layers="auto"``): when a target is named ``embed_tokens`` or ``lm_head``."""
    lora_names = set(lora_names)
    if not _embedding_targeted(config, lora_names):
        return []
    out = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        fn = getattr(model, getter, None)
        layer = fn() if callable(fn) else None
        for name, module in model.named_modules():
            if layer is not None and module is layer and name in lora_names and name not in out:
                out.append(name)
    return out


def _expected_keys(
    model, config, targets, mts_names, expert_targets=()
) -> tuple[dict, set[str], dict]:
    """``{PEFT key: (shape, setter)}`` of everything the checkpoint must hold, the PEFT keys it
    may hold without our using them, and those it may hold that we load when present (the
    adapted layers' base weights, which PEFT writes for embeddings)."""
    expected: dict[str, tuple[tuple[int, ...], tuple]] = {}
    optional: dict[str, tuple[tuple[int, ...], tuple]] = {}
    for t in targets:
        layer = t.module
        prefix = f"{KEY_PREFIX}{t.name}"
        optional[f"{prefix}.base_layer.weight"] = (tuple(layer.weight.shape), ("table", t.name))
        if t.kind == "embedding":
            a_shape, b_shape = (t.r, t.in_features), (t.out_features, t.r)
            expected[f"{prefix}.lora_embedding_A"] = (a_shape, ("lora_embedding_A", t.name))
            expected[f"{prefix}.lora_embedding_B"] = (b_shape, ("lora_embedding_B", t.name))
            continue
        expected[f"{prefix}.lora_A.weight"] = ((t.r, t.in_features), ("lora_A", t.name))
        expected[f"{prefix}.lora_B.weight"] = ((t.out_features, t.r), ("lora_B", t.name))
        if config.use_dora:
            expected[f"{prefix}.lora_magnitude_vector"] = ((t.out_features,), ("dora", t.name))
        if config.bias == "lora_only" and layer.bias is not None:
            expected[f"{prefix}.base_layer.bias"] = (tuple(layer.bias.shape), ("bias", t.name))
    for t in expert_targets:
        base = t.module.base_layer if isinstance(t.module, FusedLoraExperts) else t.module
        num_experts = base.gate_up_proj.shape[0]
        for param, depth in expert_key_prefixes(list(t.ranks)).items():
            w = getattr(base, param)
            transposed = bool(getattr(base, "is_transposed", False))
            n_in, n_out = (w.shape[1], w.shape[2]) if transposed else (w.shape[2], w.shape[1])
            re_ = t.ranks[param] * num_experts
            prefix = f"{KEY_PREFIX}{t.name}.{depth}"
            expected[f"{prefix}lora_A.weight"] = ((re_, n_in), ("expert", t.name, param, "lora_A"))
            expected[f"{prefix}lora_B.weight"] = ((n_out, re_), ("expert", t.name, param, "lora_B"))
    state = model.state_dict(keep_vars=True)
    tolerated: set[str] = set()
    if config.bias == "all":
        lora_names = {t.name for t in targets} | {n for n, _ in lora_layers(model)}
        for peft_key, key in _bias_keys(model, lora_names, mts_names).items():
            expected[peft_key] = (tuple(state[key].shape), ("param", key))
    for name, module in _saved_modules(model, mts_names).items():
        for key, value in module.state_dict().items():
            expected[f"{KEY_PREFIX}{name}.{key}"] = (tuple(value.shape), ("mts", name, key))
            if config.bias == "all" and key.endswith("bias"):
                # PEFT's bias="all" also writes the wrapper's inner keys (redundant copies).
                tolerated.add(f"{KEY_PREFIX}{name}.original_module.{key}")
                tolerated.add(f"{KEY_PREFIX}{name}.modules_to_save.{key}")
    return expected, tolerated, optional


def _canonical(key: str) -> str:
    m = _MAGNITUDE_KEY.match(key.removeprefix(KEY_PREFIX))
    if m is not None:
        return f"{KEY_PREFIX}{m.group('module')}.lora_magnitude_vector"
    try:
        module, part = split_peft_key(key)
    except ValueError:
        return key
    suffix = "" if part.startswith("lora_embedding_") else ".weight"
    return f"{KEY_PREFIX}{module}.{part}{suffix}"


def _replacement_problems(model, config, adapter_name, targets, mts_names) -> list[str]:
    """How the saved adapter differs from the model's adapter ``adapter_name`` (which a load
    into that name replaces): targets, ranks and modules to save must agree (``_plan`` has
    already refused a merged adapter)."""
    have = {
        name: layer.r[adapter_name]
        for name, layer in lora_layers(model)
        if adapter_name in layer.adapter_names
    }
    want = {t.name: t.r for t in targets}
    problems = []
    only_model = sorted(set(have) - set(want))
    only_file = sorted(set(want) - set(have))
    if only_model:
        problems.append(f"layers the model's adapter has and the checkpoint lacks {only_model}")
    if only_file:
        problems.append(f"layers the checkpoint targets and the model's adapter lacks {only_file}")
    ranks = [
        f"{n}: r={have[n]} in the model, {want[n]} in the checkpoint"
        for n in sorted(set(have) & set(want))
        if have[n] != want[n]
    ]
    if ranks:
        problems.append("different ranks [" + "; ".join(ranks) + "]")
    own_mts = sorted(
        name
        for name, module in model.named_modules()
        if isinstance(module, ModulesToSaveWrapper) and adapter_name in module.modules_to_save
    )
    if own_mts != sorted(mts_names):
        problems.append(f"modules to save {own_mts} in the model, {sorted(mts_names)} in the file")
    return problems


def _expert_replacement_problems(model, adapter_name, expert_targets) -> list[str]:
    """How the saved expert targets differ from the model's adapter ``adapter_name``'s."""
    have = {
        (name, p): layer.r[p][adapter_name]
        for name, layer in expert_layers(model)
        if adapter_name in layer.adapter_names
        for p in layer.adapter_params(adapter_name)
    }
    want = {(t.name, p): r for t in expert_targets for p, r in t.ranks.items()}
    if have == want:
        return []
    return [f"expert parameters and ranks {sorted(have.items())} in the model, "
            f"{sorted(want.items())} in the checkpoint"]  # fmt: skip


def load_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    adapter_name: str = "default",
    *,
    is_trainable: bool = False,
    backend: str = "auto",
) -> nn.Module:
    """Load a PEFT-layout adapter (what PEFT's ``save_pretrained`` or :func:`save_adapter` wrote)
    into ``model`` as adapter ``adapter_name``, and make it the active one.

    A plain model is converted first with the saved config (``get_lora_model``); a converted one
    gets one more adapter. Into an adapter name the model already has, the saved weights replace
    that adapter's in place, as PEFT's ``load_adapter`` does (build with a config, then load the
    trained weights): its targets, ranks and modules to save must be the checkpoint's, and its
    config (scaling included) stays, as in PEFT. Every key, shape and config field is checked
    before the model changes: missing, unexpected or mis-shaped tensors, or an existing adapter
    that does not fit, raise one ``ValueError`` listing them all, and leave the model as it was.
    The adapter is frozen unless ``is_trainable`` (PEFT's flag).

    Returns:
        ``model``.
    """
    fn = "load_adapter"
    config_dict, raw = read_peft_adapter(path)
    try:
        config = LoraConfig.from_dict(config_dict, loading=True)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{fn}: {os.fspath(path)!r}: {e}") from None
    config.inference_mode = not is_trainable
    existing = getattr(model, "lora_configs", None) or {}
    replacing = adapter_name in existing
    targets, _, mts_names = plan_targets(model, config, adapter_name, replacing=replacing)
    expert_targets = plan_expert_targets(model, config, fn)
    expected, tolerated, optional = _expected_keys(
        model, config, targets, mts_names, expert_targets
    )
    tensors = {}
    for key, value in raw.items():
        tensors.setdefault(_canonical(key), value)
    expected.update({k: v for k, v in optional.items() if k in tensors})
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - tolerated)
    misshaped = [
        f"{k}: expected {fmt_shape(expected[k][0])}, got {fmt_shape(v.shape)}"
        for k, v in sorted(tensors.items())
        if k in expected and tuple(v.shape) != expected[k][0]
    ]
    not_float = [
        f"{k} ({v.dtype})"
        for k, v in sorted(tensors.items())
        if k in expected and not v.is_floating_point()
    ]
    problems = []
    if replacing:
        problems = _replacement_problems(model, config, adapter_name, targets, mts_names)
        problems += _expert_replacement_problems(model, adapter_name, expert_targets)
    if missing or unexpected or misshaped or not_float or problems:
        if missing:
            problems.append(f"missing keys {missing}")
        if unexpected:
            problems.append(f"unexpected keys {unexpected}")
        if misshaped:
            problems.append("mis-shaped tensors [" + "; ".join(misshaped) + "]")
        if not_float:
            problems.append(f"non-floating tensors {not_float}")
        into = f" into its existing adapter {adapter_name!r}" if replacing else ""
        raise ValueError(
            f"{fn}: {os.fspath(path)!r} does not fit this model{into} with its adapter config "
            f"(r={config.r}, target_modules={config.target_modules!r}): "
            + "; ".join(problems)
            + ". The model is unchanged."
        )
    if replacing:
        existing[adapter_name].inference_mode = config.inference_mode
    else:
        get_lora_model(model, config, adapter_name, backend=backend)
    state = model.state_dict(keep_vars=True)
    with torch.no_grad():
        for key, (_, where) in expected.items():
            value = tensors[key]
            kind = where[0]
            if kind in ("lora_A", "lora_B"):
                dest = getattr(model.get_submodule(where[1]), kind)[adapter_name].weight
            elif kind == "expert":
                layer = model.get_submodule(where[1])
                dest = getattr(layer, where[3])[where[2]][adapter_name].weight
            elif kind == "dora":
                dest = model.get_submodule(where[1]).lora_magnitude_vector[adapter_name].weight
            elif kind in ("lora_embedding_A", "lora_embedding_B"):
                dest = getattr(model.get_submodule(where[1]), kind)[adapter_name]
            elif kind == "table":
                dest = model.get_submodule(where[1]).weight
            elif kind == "bias":
                dest = model.get_submodule(where[1]).bias
            elif kind == "param":
                dest = state[where[1]]
            else:
                copy = model.get_submodule(where[1]).modules_to_save[adapter_name]
                dest = copy.state_dict(keep_vars=True)[where[2]]
            dest.copy_(value)
    if replacing:
        set_adapter(model, adapter_name)
    return model
