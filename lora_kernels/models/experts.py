"""PEFT's ``target_parameters`` on mixture-of-experts models: which fused-experts modules a
config adapts, and the checkpoint keys of their factors.

PEFT matches ``target_parameters`` entries against ``<module name>.<parameter name>`` (equal, or
ending with ``"." + entry``) and wraps each matched parameter in a ``ParamWrapper``; several
parameters of one module nest, the first registered innermost (``gate_up_proj`` inside
``down_proj`` for every transformers 5 experts class). A checkpoint keys the outermost
wrapper's factors ``<module>.lora_A.weight`` and each one further in with one more
``base_layer.``: with both projections adapted, ``down_proj``'s are ``experts.lora_A.weight``
and ``gate_up_proj``'s ``experts.base_layer.lora_A.weight``. Ranks and alphas come from
``rank_pattern`` / ``alpha_pattern`` matched against ``<module>.<parameter>``, as PEFT does.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn

from ..layers.moe import EXPERT_PARAMS, FusedLoraExperts, experts_format
from .config import LoraConfig

__all__ = ["ExpertTarget", "expert_key_prefixes", "expert_layers", "plan_expert_targets"]


@dataclass
class ExpertTarget:
    name: str
    module: nn.Module  # the experts module, or the FusedLoraExperts already wrapping it
    ranks: dict[str, int]
    alphas: dict[str, float]


def expert_layers(model: nn.Module) -> Iterator[tuple[str, FusedLoraExperts]]:
    """``(name, layer)`` for every ``FusedLoraExperts`` of ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, FusedLoraExperts):
            yield name, module


def _matches(key: str, targets: list[str]) -> bool:
    return key in targets or any(key.endswith(f".{t}") for t in targets)


def plan_expert_targets(model: nn.Module, config: LoraConfig, fn: str) -> list[ExpertTarget]:
    """The experts modules ``config.target_parameters`` adapts, every check done before the
    model changes: what the kernels do not compute is refused here, with the reason."""
    targets = sorted(set(config.target_parameters or []))
    if not targets:
        return []
    refused = []
    if config.use_dora:
        refused.append("use_dora=True (DoRA on expert parameters; PEFT refuses it too)")
    if config.lora_dropout:
        refused.append(
            f"lora_dropout={config.lora_dropout} (x cannot be factored out of B A dropout(x); "
            "PEFT refuses it too)"
        )
    if refused:
        raise ValueError(f"{fn}: target_parameters cannot be used with " + ", ".join(refused))
    inside = set()
    found, unsupported = [], []
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in inside):
            continue
        base = module.base_layer if isinstance(module, FusedLoraExperts) else module
        if isinstance(module, FusedLoraExperts):
            inside.add(name)
        matched = [
            p for p, _ in base.named_parameters(recurse=False) if _matches(f"{name}.{p}", targets)
        ]
        if not matched:
            continue
        try:
            fmt = experts_format(base)
        except ValueError as e:
            unsupported.append(f"{name} ({e})")
            continue
        others = [p for p in matched if p not in EXPERT_PARAMS]
        if fmt is None or others:
            what = others or matched
            unsupported.append(f"{name}.{'/'.join(what)} ({type(base).__name__})")
            continue
        ranks, alphas = {}, {}
        for p in matched:
            ranks[p], alphas[p] = config.rank_and_alpha(f"{name}.{p}")
        found.append(ExpertTarget(name, module, ranks, alphas))
    if unsupported:
        raise ValueError(
            f"{fn}: target_parameters {targets} matches parameters the kernels do not adapt (the "
            "gate_up_proj / down_proj of transformers 5 fused experts with SiLU-GLU or gpt-oss's "
            f"SwiGLU): {', '.join(unsupported)}. Run this adapter with PEFT"
        )
    if not found:
        raise ValueError(f"{fn}: target_parameters {targets} matches no parameter of the model")
    return found


def expert_key_prefixes(params: list[str]) -> dict[str, str]:
    """``{parameter: "base_layer." * depth}`` for the adapted ``params`` of one module: the
    last (outermost PEFT wrapper) has none."""
    ordered = [p for p in EXPERT_PARAMS if p in params]
    return {p: "base_layer." * (len(ordered) - 1 - i) for i, p in enumerate(ordered)}
