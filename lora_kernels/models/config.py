"""``LoraConfig``: a LoRA adapter's configuration, with PEFT's field names, defaults and
``adapter_config.json`` form (``lora_scaling``, the one formula for an adapter's scale, lives
with the layers in ``layers/base.py`` and is re-exported here).

PEFT's ``LoraConfig`` has more fields than we compute; the tables below say which of them are
harmless to ignore and which change the math (refused when set, never silently dropped).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass, field

from ..layers.base import INIT_MODES, lora_scaling

__all__ = ["LoraConfig", "as_lora_config", "lora_scaling"]

BIAS_MODES = ("none", "all", "lora_only")

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
    "lora_bias": False,
    "use_qalora": False,
    "layer_replication": None,
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
        lora_alpha: scaling numerator (see :func:`lora_scaling`); ``alpha_pattern`` overrides
            it per module.
        lora_dropout: dropout on the LoRA branch's input during training.
        target_modules: list of names / name suffixes, a full-match regex, ``"all-linear"``, or
            None for PEFT's default of the model's architecture.
        exclude_modules: same forms; matching modules are never adapted.
        bias: ``"none"``, ``"all"`` or ``"lora_only"``: which biases train.
        use_rslora: rank-stabilised scaling ``lora_alpha / sqrt(r)``.
        use_dora: DoRA (weight-decomposed LoRA): each adapted layer also trains a magnitude
            ``lora_magnitude_vector[name].weight`` [out_features], PEFT's semantics and keys.
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
        target_parameters: PEFT's parameter targets: ``"<module>.<parameter>"`` names (or their
            endings) of 3-D expert parameters (``"mlp.experts.gate_up_proj"``,
            ``"mlp.experts.down_proj"``) of transformers 5 fused experts, adapted by
            ``FusedLoraExperts`` with PEFT's ``ParamWrapper`` layout.
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
    use_dora: bool = False
    layers_to_transform: list[int] | int | None = None
    layers_pattern: list[str] | str | None = None
    fan_in_fan_out: bool = False
    task_type: str | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    target_parameters: list[str] | None = None

    def __post_init__(self) -> None:
        fn = "LoraConfig"
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"{fn}: expected r to be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)):
            raise TypeError(f"{fn}: expected lora_alpha to be a number, got {self.lora_alpha!r}")
        if not 0.0 <= float(self.lora_dropout) < 1.0:
            raise ValueError(f"{fn}: expected lora_dropout in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.use_dora, bool):
            raise TypeError(f"{fn}: expected use_dora to be a bool, got {self.use_dora!r}")
        if self.bias not in BIAS_MODES:
            raise ValueError(f"{fn}: expected bias in {BIAS_MODES}, got {self.bias!r}")
        if self.init_lora_weights not in INIT_MODES:
            raise ValueError(
                f"{fn}: expected init_lora_weights in {INIT_MODES}, got "
                f"{self.init_lora_weights!r} (other PEFT initialisations are not supported)"
            )
        self.target_modules = _as_name_list(fn, "target_modules", self.target_modules)
        self.exclude_modules = _as_name_list(fn, "exclude_modules", self.exclude_modules)
        tps = _as_name_list(fn, "target_parameters", self.target_parameters)
        self.target_parameters = [tps] if isinstance(tps, str) else tps
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
        refused with a ``ValueError`` when they do (``lora_bias``, ...). ``loading=True``
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


def as_lora_config(fn: str, config: object) -> LoraConfig:
    """``config`` as our ``LoraConfig``: ours as it is, PEFT's own ``peft.LoraConfig`` converted
    field by field through :meth:`LoraConfig.from_dict` (its ``to_dict()``: the same fields
    PEFT writes to ``adapter_config.json``, so a field that changes the math and that we do not
    compute is refused by name, never dropped). Anything else: a ``TypeError`` that names the
    class with its module (two classes called ``LoraConfig`` read alike otherwise)."""
    if isinstance(config, LoraConfig):
        return config
    cls = type(config)
    where = f"{cls.__module__}.{cls.__qualname__}"
    if cls.__module__.split(".")[0] == "peft" and cls.__name__ == "LoraConfig":
        return LoraConfig.from_dict(dict(config.to_dict()))
    raise TypeError(
        f"{fn}: expected config to be a lora_kernels.LoraConfig (or PEFT's peft.LoraConfig), "
        f"got {where}"
    )
