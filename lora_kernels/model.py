"""Whole-model LoRA: ``LoraConfig``, PEFT's target matching, ``get_lora_model`` and friends.

``get_lora_model(model, config)`` replaces, in place, every ``nn.Linear`` (or transformers
``Conv1D``) that ``config`` targets with a :class:`~lora_kernels.nn.FusedLoraLinear`, and every
targeted ``nn.Embedding`` with a :class:`~lora_kernels.nn_embedding.FusedLoraEmbedding`, each
sharing the module's weight and bias (no copy), and freezes everything but the adapter. The
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

Model-level state lives on the model passed in: ``model.lora_configs`` (adapter name ->
``LoraConfig``) and ``model.active_lora_adapter``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import re
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .nn import BASE_ADAPTER, FusedLoraLinear
from .nn_embedding import FusedLoraEmbedding, unsupported_embedding_options

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

ALL_LINEAR = "all-linear"
BIAS_MODES = ("none", "all", "lora_only")
INIT_MODES = (True, False, "gaussian")

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

# PEFT LoraConfig fields that carry no math we must reproduce: metadata, or settings that act
# only when the adapter is first initialised (loading overwrites the weights they produce).
IGNORED_PEFT_FIELDS = frozenset(
    {
        "peft_type",
        "peft_version",
        "auto_mapping",
        "megatron_core",
        "qalora_group_size",
        "loftq_config",
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "runtime_config",
        # VeLoRA changes only how the backward pass stores activations; the forward is LoRA's.
        "velora_config",
    }
)

# PEFT LoraConfig fields that change the math when set, with the value that means "off". A config
# that turns any of them on is refused: silently dropping one would give different outputs.
UNSUPPORTED_PEFT_FIELDS = {
    "use_dora": False,
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
    "target_parameters": None,
    "trainable_token_indices": None,
    "alora_invocation_tokens": None,
    "megatron_config": None,
    "use_bdlora": None,
    "arrow_config": None,
    "kasa_config": None,
    "monteclora_config": None,
    "ensure_weight_tying": False,
}

# init_lora_weights values under which PEFT rewrites the base weights when the adapter is created:
# such an adapter is only valid on that rewritten base, which a plain model does not have.
BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# Other PEFT inits only choose the adapter's starting values: harmless when loading trained weights.
LOAD_ONLY_INITS = ("eva", "orthogonal", "mica")


def _is_off(value) -> bool:
    return value is None or value is False or value == {} or value == []


def _as_name_list(fn: str, name: str, value) -> list[str] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple, set, frozenset)) and all(isinstance(v, str) for v in value):
        return sorted(value) if isinstance(value, (set, frozenset)) else list(value)
    raise TypeError(f"{fn}: expected {name} to be None, a str or a list of str, got {value!r}")


@dataclass
class LoraConfig:
    """A LoRA adapter's configuration, with PEFT's ``LoraConfig`` field names and defaults.

    Args:
        r: rank of every adapted layer (``rank_pattern`` overrides it per module).
        lora_alpha: scaling numerator: ``scaling = lora_alpha / r`` (``/ sqrt(r)`` with
            ``use_rslora``); ``alpha_pattern`` overrides it per module.
        lora_dropout: dropout on the LoRA branch's input during training.
        target_modules: list of names / name suffixes, a full-match regex, ``"all-linear"``, or
            None for PEFT's default of the model's architecture.
        exclude_modules: same forms; matching modules are never adapted.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases train.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        init_lora_weights: ``True``, ``False`` or ``"gaussian"`` (see ``FusedLoraLinear``).
        rank_pattern, alpha_pattern: ``{module name pattern: r or alpha}``.
        modules_to_save: modules trained whole and saved with the adapter (e.g. a classifier).
        layers_to_transform: layer index or indices to adapt (list ``target_modules`` only).
        layers_pattern: the name(s) of the layer list, e.g. ``"layers"`` (with
            ``layers_to_transform``).
        fan_in_fan_out: PEFT's flag for GPT-2 ``Conv1D`` weights; ``nn.Linear`` ignores it.
        task_type: PEFT's task type (``"CAUSAL_LM"``, ``"SEQ_CLS"``, ...): chooses the PEFT
            model class when PEFT loads the adapter; ``SEQ_CLS``/``TOKEN_CLS`` train the
            ``classifier``/``score`` head whole, as PEFT does.
        inference_mode: the adapter is frozen (what a loaded, non-trainable adapter records).
        base_model_name_or_path, revision: recorded in ``adapter_config.json``.
    """

    r: int = 8
    lora_alpha: float = 8
    lora_dropout: float = 0.0
    target_modules: list[str] | str | None = None
    exclude_modules: list[str] | str | None = None
    bias: str = "none"
    use_rslora: bool = False
    init_lora_weights: bool | str = True
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    modules_to_save: list[str] | None = None
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None

    def __post_init__(self) -> None:
        fn = "LoraConfig"
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{fn}: expected r to be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"{fn}: expected lora_alpha to be a number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"{fn}: expected lora_dropout in [0, 1), got {self.lora_dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"{fn}: expected bias in {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES:
            raise ValueError(
                f"{fn}: expected init_lora_weights in {INIT_MODES}, got "
                f"{self.init_lora_weights!r} (other PEFT initialisations are not supported)"
            )
        self.target_modules = _as_name_list(fn, "target_modules", self.target_modules)
        self.exclude_modules = _as_name_list(fn, "exclude_modules", self.exclude_modules)
        mts = _as_name_list(fn, "modules_to_save", self.modules_to_save)
        if isinstance(mts, str):
            raise TypeError(f"{fn}: expected modules_to_save to be a list of str, got {mts!r}")
        self.modules_to_save = mts
        self.layers_pattern = _as_name_list(fn, "layers_pattern", self.layers_pattern)
        layers = self.layers_to_transform
        if layers is not None and not (
            (isinstance(layers, int) and not isinstance(layers, bool))
            or (isinstance(layers, (list, tuple)) and all(isinstance(i, int) for i in layers))
        ):
            raise TypeError(
                f"{fn}: expected layers_to_transform to be None, an int or a list of int, "
                f"got {layers!r}"
            )
        if isinstance(layers, tuple):
            self.layers_to_transform = list(layers)
        if isinstance(self.target_modules, str) and self.layers_to_transform is not None:
            raise ValueError(
                f"{fn}: layers_to_transform cannot be used when target_modules is a str "
                f"({self.target_modules!r}), as in PEFT"
            )
        if isinstance(self.target_modules, str) and self.layers_pattern is not None:
            raise ValueError(f"{fn}: layers_pattern cannot be used when target_modules is a str")
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError(f"{fn}: layers_pattern needs layers_to_transform")
        for name, table, kind in (
            ("rank_pattern", self.rank_pattern, int),
            ("alpha_pattern", self.alpha_pattern, (int, float)),
        ):
            if not isinstance(table, dict) or not all(
                isinstance(k, str) and isinstance(v, kind) and not isinstance(v, bool)
                for k, v in table.items()
            ):
                raise TypeError(
                    f"{fn}: expected {name} to be a dict of str -> number, got {table!r}"
                )
        bad = {k: v for k, v in self.rank_pattern.items() if v < 1}
        if bad:
            raise ValueError(f"{fn}: expected positive ranks in rank_pattern, got {bad}")

    # --------------------------------------------------------------------------------------
    # PEFT's adapter_config.json
    # --------------------------------------------------------------------------------------

    def to_dict(self) -> dict:
        """The fields PEFT's ``adapter_config.json`` holds: ours, plus PEFT's others left off."""
        out = {
            "peft_type": "LORA",
            "auto_mapping": None,
            "megatron_core": "megatron.core",
            "qalora_group_size": 16,
            "loftq_config": {},
            "eva_config": None,
            "corda_config": None,
            "lora_ga_config": None,
            "velora_config": None,
        }
        out.update(UNSUPPORTED_PEFT_FIELDS)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = copy.deepcopy(value)
        return dict(sorted(out.items()))

    @classmethod
    def from_dict(cls, config: dict, *, loading: bool = False) -> LoraConfig:
        """A ``LoraConfig`` from PEFT's config dict (``adapter_config.json``).

        Fields PEFT has and we do not model are ignored when they do not change the math and
        refused with a ``ValueError`` when they do (DoRA, ``lora_bias``, ...). ``loading=True``
        accepts initialisations that only set starting values (``"eva"``, ...), since loading
        overwrites those values.
        """
        fn = "LoraConfig.from_dict"
        if not isinstance(config, dict):
            raise TypeError(f"{fn}: expected a dict, got {type(config).__name__}")
        peft_type = config.get("peft_type", "LORA")
        if peft_type != "LORA":
            raise ValueError(f"{fn}: expected peft_type 'LORA', got {peft_type!r}")
        ours = {f.name for f in dataclasses.fields(cls)}
        kwargs, refused = {}, []
        for key, value in config.items():
            if key in ours:
                kwargs[key] = value
            elif key in UNSUPPORTED_PEFT_FIELDS:
                if value != UNSUPPORTED_PEFT_FIELDS[key] and not _is_off(value):
                    refused.append(f"{key}={value!r}")
            elif key not in IGNORED_PEFT_FIELDS and not _is_off(value):
                # A field from a newer PEFT: we cannot tell what it does, so it must be off.
                refused.append(f"{key}={value!r} (unknown field)")
        init = kwargs.get("init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(BASE_REWRITING_INITS):
            refused.append(
                f"init_lora_weights={init!r} (the adapter belongs to a base model whose weights "
                "PEFT rewrote; convert it with PEFT's save_pretrained("
                "path_initial_model_for_weight_conversion=...) first)"
            )
        elif loading and isinstance(init, str) and init.lower() in LOAD_ONLY_INITS:
            kwargs["init_lora_weights"] = True
        if refused:
            raise ValueError(
                f"{fn}: lora_kernels does not support " + ", ".join(refused) + "; "
                "run this adapter with PEFT (lora_kernels.integrations.peft.fuse keeps "
                "PEFT's own code for what we do not compute)"
            )
        return cls(**kwargs)

    # --------------------------------------------------------------------------------------
    # matching
    # --------------------------------------------------------------------------------------

    def rank_and_alpha(self, name: str) -> tuple[int, float]:
        """PEFT's ``get_pattern_key``: the first pattern matching the end of ``name`` wins."""
        r, alpha = self.r, self.lora_alpha
        for pattern, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                r = value
                break
        for pattern, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({pattern})$", name):
                alpha = value
                break
        return r, alpha


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


def _is_target(config: LoraConfig, targets: list[str] | str, key: str) -> bool:
    """PEFT's ``check_target_module_exists`` with ``targets`` resolved from the config."""
    if config.exclude_modules and _matches_names(config.exclude_modules, key):
        return False
    mts = _modules_to_save(config)
    if mts and any(re.match(rf"(^|.*\.){m}($|\..*)", key) for m in mts):
        return False
    if not _matches_names(targets, key):
        return False
    return isinstance(targets, str) or _in_layers(config, key)


def _modules_to_save(config: LoraConfig) -> list[str]:
    names = list(config.modules_to_save or [])
    for head in TASK_HEADS.get(config.task_type or "", []):
        if head not in names:
            names.append(head)
    return names


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _candidate_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
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


def _resolve_targets(model: nn.Module, config: LoraConfig) -> list[str] | str:
    targets = config.target_modules
    if targets is None:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
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
            for name, m in _candidate_modules(model)
            if isinstance(m, kinds) and name not in heads and name
        )
    return targets


@dataclass
class _Target:
    name: str
    module: nn.Module
    r: int
    alpha: float
    kind: str = "linear"  # "linear", "conv1d" (fan_in_fan_out) or "embedding"
    in_features: int = 0  # PEFT's: A is [r, in_features], B [out_features, r]
    out_features: int = 0


def _target_kind(module: nn.Module, conv1d) -> tuple[str, int, int] | None:
    """``(kind, in_features, out_features)`` of a module get_lora_model adapts, else None."""
    if isinstance(module, FusedLoraEmbedding) or type(module) is nn.Embedding:
        return "embedding", module.num_embeddings, module.embedding_dim
    if isinstance(module, FusedLoraLinear):
        kind = "conv1d" if module.fan_in_fan_out else "linear"
        return kind, module.in_features, module.out_features
    if type(module) is nn.Linear:
        return "linear", module.in_features, module.out_features
    if conv1d is not None and isinstance(module, conv1d):
        return "conv1d", module.nx, module.nf
    return None


def _plan(model: nn.Module, config: LoraConfig, adapter_name: str, *, replacing: bool = False):
    """Every check of ``get_lora_model``, before anything changes: ``(targets, resolved
    target_modules, modules_to_save names)``. ``replacing``: the adapter may exist already (a
    load into it replaces its weights)."""
    fn = "get_lora_model"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected model to be an nn.Module, got {type(model).__name__}")
    if not isinstance(config, LoraConfig):
        raise TypeError(f"{fn}: expected config to be a LoraConfig, got {type(config).__name__}")
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
    merged = [name for name, layer in lora_layers(model) if layer.merged]
    if merged:
        raise RuntimeError(f"{fn}: layers {merged[:3]} are merged; unmerge them first")
    targets = _resolve_targets(model, config)
    conv1d = _conv1d_type()
    found, unsupported = [], []
    for name, module in _candidate_modules(model):
        if not name or not _is_target(config, targets, name):
            continue
        kind = _target_kind(module, conv1d)
        bad = unsupported_embedding_options(module) if kind and kind[0] == "embedding" else []
        if kind is not None and not bad:
            r, alpha = config.rank_and_alpha(name)
            found.append(_Target(name, module, r, alpha, *kind))
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
    if not found:
        raise ValueError(
            f"{fn}: target_modules {targets!r} matches no nn.Linear (nor Conv1D, nn.Embedding) "
            "of the model "
            f"(exclude_modules={config.exclude_modules!r}, "
            f"layers_to_transform={config.layers_to_transform!r})"
        )
    mts_names = []
    wanted = _modules_to_save(config)
    if wanted:
        targeted = {t.name for t in found}
        for name, module in _candidate_modules(model):
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


# ------------------------------------------------------------------------------------------
# modules trained whole
# ------------------------------------------------------------------------------------------


class ModulesToSaveWrapper(nn.Module):
    """A module trained whole per adapter (PEFT's ``modules_to_save``), with PEFT's layout:
    ``original_module`` (frozen) and ``modules_to_save[adapter]`` (a trainable copy).

    The forward runs the active adapter's copy, or the original when no adapter of this wrapper
    is active. Attributes not found on the wrapper are read from the module it runs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def _running(self) -> nn.Module:
        if self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self._running()(*args, **kwargs)
        # A mixed batch: rows grouped by adapter, each group through its own copy.
        x, rest = args[0], args[1:]
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = torch.tensor(
                [i for i, n in enumerate(adapter_names) if n == name], device=x.device
            )
            if name in self.modules_to_save:
                y = self.modules_to_save[name](x[rows], *rest, **kwargs)
            else:
                y = self.original_module(x[rows], *rest, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active_adapter") or (
                "_modules" not in self.__dict__
            ):
                raise
            return getattr(self._running(), name)


# ------------------------------------------------------------------------------------------
# get_lora_model and model-level adapter management
# ------------------------------------------------------------------------------------------


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def lora_layers(model: nn.Module) -> Iterator[tuple[str, FusedLoraLinear | FusedLoraEmbedding]]:
    """``(name, layer)`` for every ``FusedLoraLinear`` and ``FusedLoraEmbedding`` of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, (FusedLoraLinear, FusedLoraEmbedding)):
            yield name, module


def _wrappers(model: nn.Module) -> Iterator[tuple[str, ModulesToSaveWrapper]]:
    for name, module in model.named_modules():
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
    targets, resolved, mts_names = _plan(model, config, adapter_name)
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
    layers = list(lora_layers(model))
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
    layers = [layer for _, layer in lora_layers(model) if adapter_name in layer.adapter_names]
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
    for name, layer in list(lora_layers(model)):
        if active is not None and active in layer.adapter_names and not layer.merged:
            layer.merge(active)
        _replace(model, name, _plain_module(layer))
    for name, wrapper in list(_wrappers(model)):
        _replace(model, name, wrapper._running())
    del model.lora_configs
    del model.active_lora_adapter
    return model


def _plain_module(layer: FusedLoraLinear | FusedLoraEmbedding) -> nn.Module:
    """The plain module a LoRA layer stands in for, sharing its (merged) weight and bias."""
    with torch.device("meta"):
        if isinstance(layer, FusedLoraEmbedding):
            plain = nn.Embedding(
                layer.num_embeddings, layer.embedding_dim, padding_idx=layer.padding_idx
            )
        elif layer.fan_in_fan_out:
            from transformers.pytorch_utils import Conv1D

            plain = Conv1D(layer.out_features, layer.in_features)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    plain.weight = layer.weight
    if not isinstance(layer, FusedLoraEmbedding):
        plain.bias = layer.bias
    return plain


@contextlib.contextmanager
def mixed_batch(model: nn.Module, adapter_names: Sequence[str]):
    """Within the block, each row (2-D inputs) or sequence (3-D inputs) of ``model``'s batch runs
    its own adapter: ``adapter_names[i]`` (``"__base__"``: no adapter), PEFT's ``adapter_names``.

    Every ``FusedLoraLinear`` and ``ModulesToSaveWrapper`` receives the names through a forward
    pre-hook; a layer that lacks one of the adapters runs those rows on its base weight.
    """
    fn = "mixed_batch"
    configs = _check_model(fn, model)
    names = list(adapter_names)
    unknown = sorted({n for n in names if n != BASE_ADAPTER and n not in configs})
    if unknown:
        raise ValueError(
            f"{fn}: unknown adapters {unknown} in adapter_names; the model has {list(configs)} "
            f"(and {BASE_ADAPTER!r} for none)"
        )

    def layer_hook(layer, args, kwargs):
        own = layer.adapter_names
        kwargs["adapter_names"] = [n if n in own else BASE_ADAPTER for n in names]
        return args, kwargs

    def wrapper_hook(_, args, kwargs):
        kwargs["adapter_names"] = names
        return args, kwargs

    handles = [
        m.register_forward_pre_hook(layer_hook, with_kwargs=True) for _, m in lora_layers(model)
    ]
    handles += [
        m.register_forward_pre_hook(wrapper_hook, with_kwargs=True) for _, m in _wrappers(model)
    ]
    try:
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
