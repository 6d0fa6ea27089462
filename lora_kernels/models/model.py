"""Whole-model LoRA: ``get_lora_model`` and the functions that manage a model's adapters.

``get_lora_model(model, config)`` replaces, in place, every ``nn.Linear`` (or transformers
``Conv1D``) that ``config`` targets with a :class:`~lora_kernels.nn.FusedLoraLinear`, and every
targeted ``nn.Embedding`` with a :class:`~lora_kernels.nn_embedding.FusedLoraEmbedding`, each
sharing the module's weight and bias (no copy), and every transformers 5 fused-experts module
whose 3-D parameters ``target_parameters`` names with a ``FusedLoraExperts`` (PEFT's
``ParamWrapper`` factors), and freezes everything but the adapter. The
matching follows PEFT's rules exactly (``peft.tuners.tuners_utils.check_target_module_exists``
and friends), so a config that targets a set of modules in PEFT targets the same set here and
PEFT checkpoints line up key for key:

* ``target_modules``: a list (a module matches when its full name equals an entry or ends with
  ``"." + entry``), a string (a regular expression that must match the full name), or
  ``"all-linear"`` (every linear layer but a transformers model's output head); ``None`` takes
  PEFT's default for the model's ``config.model_type``.
* ``exclude_modules``: the same forms, checked first.
* ``layers_to_transform`` / ``layers_pattern``: with a list of targets, keep only modules whose
  layer index (the first number after ``<layers_pattern>.``, or after any name) is listed.
* ``rank_pattern`` / ``alpha_pattern``: ``{pattern: r}``; the first pattern ``p`` with
  ``re.match(rf"(.*\\.)?({p})$", name)`` gives the module its rank / alpha.
* ``modules_to_save``: modules whose name ends with an entry are trained whole; each adapter gets
  its own copy (:class:`ModulesToSaveWrapper`, PEFT's state_dict layout).
* ``bias``: ``"none"``, ``"all"`` (every bias in the model trains) or ``"lora_only"`` (the
  biases of the adapted layers train). Biases are shared by all adapters, as in PEFT.

The config lives in :mod:`lora_kernels.config`, the matching in :mod:`lora_kernels.targets`.
Model-level state lives on the model passed in: ``model.lora_configs`` (adapter name ->
``LoraConfig``) and ``model.active_lora_adapter``.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..layers import BASE_ADAPTER, FusedLoraEmbedding, FusedLoraLinear
from ..layers.moe import FusedLoraExperts
from ..serving import state as serving
from .config import LoraConfig, as_lora_config
from .experts import expert_layers, plan_expert_targets
from .modules_to_save import ModulesToSaveWrapper
from .targets import ALL_LINEAR, plan_targets

__all__ = [
    "LoraConfig",
    "ModulesToSaveWrapper",
    "delete_adapter",
    "get_lora_model",
    "lora_layers",
    "merge_and_unload",
    "mixed_batch",
    "print_trainable_parameters",
    "set_adapter",
    "trainable_parameters",
]


# ------------------------------------------------------------------------------------------
# get_lora_model and model-level adapter management
# ------------------------------------------------------------------------------------------


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _named_modules(
    module: nn.Module, prefix: str = "", memo: set | None = None
) -> Iterator[tuple[str, nn.Module]]:
    """``module.named_modules()`` without what lies inside each LoRA layer (its
    adapters' own small modules, which never hold a layer or a wrapper: with a thousand adapters
    installed they are nearly all of the model's modules, and switches and mixed batches walk
    the model)."""
    memo = set() if memo is None else memo
    if module in memo:
        return
    memo.add(module)
    yield prefix, module
    if isinstance(module, (FusedLoraLinear, FusedLoraEmbedding)):
        return
    for name, child in module._modules.items():
        if child is not None:
            yield from _named_modules(child, f"{prefix}.{name}" if prefix else name, memo)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, FusedLoraLinear | FusedLoraEmbedding]]:
    """``(name, layer)`` for every ``FusedLoraLinear`` and ``FusedLoraEmbedding`` of ``model``."""
    for name, module in _named_modules(model):
        if isinstance(module, (FusedLoraLinear, FusedLoraEmbedding)):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in _named_modules(model):
        if isinstance(module, ModulesToSaveWrapper):
            yield name, module


def get_lora_model(
    model: nn.Module, config: LoraConfig, adapter_name: str = "default", *, backend: str = "auto"
) -> nn.Module:
    """Add adapter ``adapter_name`` to ``model`` in place and make it the active, trainable one.

    Every ``nn.Linear`` or transformers ``Conv1D`` that ``config`` targets (PEFT's rules, see the
    module docstring) becomes a ``FusedLoraLinear`` sharing its weight and bias, every targeted
    ``nn.Embedding`` a ``FusedLoraEmbedding``; layers that already are ours get one more adapter.
    Every parameter outside the adapter is frozen (``bias`` and ``modules_to_save`` decide the
    exceptions). All checks run before the model changes. Call it again with another name to add
    a second adapter; ``set_adapter`` switches.

    Returns:
        ``model`` itself, with ``model.lora_configs[adapter_name] == config``.
    """
    config = as_lora_config("get_lora_model", config)
    targets, resolved, mts_names = plan_targets(model, config, adapter_name)
    expert_targets = plan_expert_targets(model, config, "get_lora_model")
    config = copy.deepcopy(config)
    if isinstance(config.target_modules, str) and config.target_modules.lower() == ALL_LINEAR:
        config.target_modules = resolved
    # Each layer takes the layout of its weight whatever the flag says, and the config keeps the
    # user's value: PEFT's rule, its warning for nn.Linear, and what its saved config holds.
    if config.fan_in_fan_out and any(t.kind == "linear" for t in targets):
        warnings.warn(
            "get_lora_model: fan_in_fan_out=True is for Conv1D weights; the targeted nn.Linear "
            "layers use fan_in_fan_out=False (as PEFT does)",
            stacklevel=2,
        )
    for t in targets:
        layer = t.module
        if t.kind == "embedding" and not isinstance(layer, FusedLoraEmbedding):
            layer = FusedLoraEmbedding.from_embedding(t.module, r=0, backend=backend)
            _replace(model, t.name, layer)
        elif t.kind != "embedding" and not isinstance(layer, FusedLoraLinear):
            layer = FusedLoraLinear.from_linear(t.module, r=0, backend=backend)
            _replace(model, t.name, layer)
        layer.add_adapter(
            adapter_name,
            t.r,
            t.alpha,
            config.lora_dropout,
            config.use_rslora,
            config.init_lora_weights,
            **({"use_dora": True} if config.use_dora else {}),
        )
    if expert_targets:  # read by switch_adapter, which must not walk the model to find them
        model.has_lora_experts = True
    for t in expert_targets:
        layer = t.module
        if not isinstance(layer, FusedLoraExperts):
            layer = FusedLoraExperts(t.module, backend=backend)
            _replace(model, t.name, layer)
        layer.add_adapter(
            adapter_name,
            t.ranks,
            t.alphas,
            use_rslora=config.use_rslora,
            init_lora_weights=config.init_lora_weights,
        )
    for name in mts_names:
        wrapper = model.get_submodule(name)
        if not isinstance(wrapper, ModulesToSaveWrapper):
            wrapper = ModulesToSaveWrapper(wrapper)
            _replace(model, name, wrapper)
        wrapper.add_adapter(adapter_name)
    if not hasattr(model, "lora_configs"):
        model.lora_configs = {}
    model.lora_configs[adapter_name] = config
    set_adapter(model, adapter_name)
    return model


def _check_model(fn: str, model: nn.Module) -> dict[str, LoraConfig]:
    configs = getattr(model, "lora_configs", None)
    if not configs:
        raise ValueError(f"{fn}: the model has no adapters (call get_lora_model first)")
    return configs


def set_adapter(model: nn.Module, adapter_name: str | None) -> None:
    """Make ``adapter_name`` the adapter every layer applies (None: the base model alone).

    Its parameters train unless its config has ``inference_mode``; every other adapter is frozen.
    Layers the adapter does not target run their base weight only.
    """
    fn = "set_adapter"
    configs = _check_model(fn, model)
    if adapter_name is not None and adapter_name not in configs:
        raise ValueError(f"{fn}: unknown adapter {adapter_name!r}; the model has {list(configs)}")
    layers = list(lora_layers(model)) + list(expert_layers(model))
    merged = [name for name, layer in layers if layer.merged]
    if merged:
        raise RuntimeError(
            f"{fn}: layers {merged[:3]}{'...' if len(merged) > 3 else ''} are merged; "
            "unmerge them before switching adapters"
        )
    for _, layer in layers:
        layer.set_adapter(adapter_name if adapter_name in layer.adapter_names else None)
    for _, wrapper in _wrappers(model):
        wrapper.active_adapter = adapter_name
    model.active_lora_adapter = adapter_name
    _mark_trainable(model, adapter_name)


def _mark_trainable(model: nn.Module, adapter_name: str | None) -> None:
    for p in model.parameters():
        p.requires_grad_(False)
    if adapter_name is None:
        return
    config = model.lora_configs[adapter_name]
    if config.inference_mode:
        return
    if config.bias == "all":
        # PEFT's rule: every parameter with "bias" in its name (other adapters' copies and the
        # originals of modules_to_save stay frozen below).
        for name, p in model.named_parameters():
            if "bias" in name:
                p.requires_grad_(True)
    for _, layer in lora_layers(model):
        if adapter_name in layer.adapter_names:
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(True)
            if config.bias == "lora_only" and getattr(layer, "bias", None) is not None:
                layer.bias.requires_grad_(True)
    for _, layer in expert_layers(model):
        if adapter_name in layer.adapter_names:
            for p in layer.adapter_parameters(adapter_name):
                p.requires_grad_(True)
    for _, wrapper in _wrappers(model):
        wrapper.requires_grad_(False)
        if adapter_name in wrapper.modules_to_save:
            wrapper.modules_to_save[adapter_name].requires_grad_(True)


def delete_adapter(model: nn.Module, adapter_name: str) -> None:
    """Remove ``adapter_name`` from every layer; if it was active, the first remaining adapter
    (or none) becomes active. Layers stay ``FusedLoraLinear`` (with no adapter: the base GEMM)."""
    fn = "delete_adapter"
    configs = _check_model(fn, model)
    if adapter_name not in configs:
        raise ValueError(f"{fn}: unknown adapter {adapter_name!r}; the model has {list(configs)}")
    every = [*lora_layers(model), *expert_layers(model)]
    layers = [layer for _, layer in every if adapter_name in layer.adapter_names]
    merged = [layer for layer in layers if adapter_name in layer.merged_adapters]
    if merged:
        raise RuntimeError(f"{fn}: adapter {adapter_name!r} is merged; unmerge it first")
    for layer in layers:
        layer.delete_adapter(adapter_name)
    for _, wrapper in _wrappers(model):
        if adapter_name in wrapper.modules_to_save:
            del wrapper.modules_to_save[adapter_name]
    del configs[adapter_name]
    active = getattr(model, "active_lora_adapter", None)
    if active == adapter_name:
        active = next(iter(configs), None)
    if configs:
        set_adapter(model, active)
    else:
        for _, wrapper in _wrappers(model):
            wrapper.active_adapter = None
        model.active_lora_adapter = None


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into the base weights and put plain modules back in place:
    each ``FusedLoraLinear`` becomes an ``nn.Linear`` (or the transformers ``Conv1D`` it was) with
    the merged weight (same storage), each ``FusedLoraEmbedding`` an ``nn.Embedding``, each
    ``ModulesToSaveWrapper`` its active copy. Returns ``model``, which no longer has adapters."""
    _check_model("merge_and_unload", model)
    active = getattr(model, "active_lora_adapter", None)
    for name, layer in [*lora_layers(model), *expert_layers(model)]:
        if active is not None and active in layer.adapter_names and not layer.merged:
            layer.merge(active)
        _replace(model, name, layer.to_base_module())
    for name, wrapper in list(_wrappers(model)):
        _replace(model, name, wrapper._running())
    del model.lora_configs
    del model.active_lora_adapter
    model.__dict__.pop("has_lora_experts", None)
    return model


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str] | torch.Tensor):
    """Within the block, each row (2-D inputs) or sequence (3-D inputs) of ``model``'s batch runs
    its own adapter: ``adapter_names[i]`` (``"__base__"``: no adapter), PEFT's ``adapter_names``.

    Every ``FusedLoraLinear`` and ``ModulesToSaveWrapper`` receives the names through a forward
    pre-hook; a layer that lacks one of the adapters runs those rows on its base weight.

    A model served from an ``AdapterCache``'s device slots (``lora_kernels.serving``) whose
    adapters of the batch all sit in slots gets the rows' slots written once into its serving
    state instead, which every layer reads. ``adapter_names`` may then also be a 1-D int32/int64
    tensor of slot indices on the model's device (-1: no adapter; ``adapter_slot_ids`` builds
    one), copied in without a host synchronisation: the way to feed a captured CUDA graph.
    """
    fn = "mixed_batch"
    served = serving.engaged_state(model)
    if served is None:
        wrappers = [m for _, m in _wrappers(model)]
    else:  # found once per engagement: a batch then costs no walk of the model
        if served.wrappers is None:
            served.wrappers = [m for _, m in _wrappers(model)]
        wrappers = served.wrappers
    if isinstance(adapter_names, torch.Tensor):
        if served is None:
            raise ValueError(
                f"{fn}: adapter ids (a tensor of slot indices) need a model served from an "
                "AdapterCache's slots (cache.attach(model, ...), then switch_adapter(model, name, "
                "cache=cache)); pass adapter names otherwise"
            )
        if wrappers:
            raise ValueError(
                f"{fn}: adapter ids (a tensor) cannot select modules_to_save copies; pass adapter "
                "names"
            )
        with served.mixed(served.check_ids(fn, adapter_names)):
            yield model
        return
    configs = _check_model(fn, model)
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in configs})
    if unknown:
        raise ValueError(
            f"{fn}: unknown adapters {unknown} in adapter_names; the model has {list(configs)} "
            f"(and {BASE_ADAPTER!r} for none)"
        )
    slot_ids = None if served is None else served.ids_of_names(names, BASE_ADAPTER)

    def layer_hook(layer, args, kwargs):
        own = layer.adapter_names
        kwargs["adapter_names"] = [n if n in own else BASE_ADAPTER for n in names]
        return args, kwargs

    def wrapper_hook(_, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = []
    if slot_ids is None:
        handles += [
            m.register_forward_pre_hook(layer_hook, with_kwargs=True)
            for _, m in [*lora_layers(model), *expert_layers(model)]
        ]
    handles += [m.register_forward_pre_hook(wrapper_hook, with_kwargs=True) for m in wrappers]
    try:
        if slot_ids is None:
            yield model
        else:
            with served.mixed(served.check_ids(fn, slot_ids)):
                yield model
    finally:
        for h in handles:
            h.remove()


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """``(trainable, total)`` parameter counts (shared parameters counted once)."""
    trainable = total = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's summary line: ``trainable params: T || all params: N || trainable%: P``."""
    trainable, total = trainable_parameters(model)
    share = 100.0 * trainable / total if total else 0.0
    print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {share:.4f}")
