"""``FusedLoraExperts``: LoRA on a transformers 5 fused-experts module (Qwen3-MoE, Mixtral,
OLMoE, gpt-oss), PEFT's ``target_parameters`` adapters on the ``moe`` kernels.

The experts module keeps its 3-D parameters (``gate_up_proj [E, 2I, H]``, ``down_proj
[E, H, I]``, or ``[E, in, out]`` when it says ``is_transposed``, gpt-oss) and its router stays
the model's: the layer replaces ``forward(hidden_states, top_k_index, top_k_weights)``. Each
adapted parameter has PEFT's ``ParamWrapper`` factors, ``lora_A[param][name].weight [E r, in]``
(the experts' rank blocks stacked) and ``lora_B[param][name].weight [out, r E]`` (interleaved),
with PEFT's ``scaling``; ``lora_kernels.functional.moe.peft_expert_factors`` reads them per expert::

    h = act(x W_gu[e]^T + s_gu (x A_gu[e]^T) B_gu[e]^T),   y = sum_j w_j (h W_d[e]^T + s_d ...)

With no active adapter (or one merged into the parameters) the layer calls the wrapped module
itself: outputs bit for bit the model's. ``merge()`` folds ``scaling * B_e A_e`` into every
expert's slice of the parameter (``exact=True``: ``unmerge()`` restores it bit for bit).
Mixed batches (``adapter_names``, one per token or per sequence) run in one grouped call; the
adapters' factor stacks it takes are kept between calls that record no graph through them
(``_mixed_stacks``: a decode loop stacks once, not per step).

Serving (``lora_kernels.serving``) treats the layer as it treats ``FusedLoraLinear``: it can
follow a model-level ``SharedActive`` (an unmerged ``switch_adapter`` without a cache is one
write) and, attached to an ``AdapterCache``'s device slots, read its adapter (or one slot per
row) from the model's ``ServingState`` through ``_serving``; anything the layer does by itself
(``set_adapter``, ``merge``, ``delete_adapter``) leaves both.

What the kernels do not compute is refused when the layer is built or the adapter added:
another activation than SiLU-GLU or gpt-oss's clamped SwiGLU, a post-expert norm, dropout on
the LoRA input (PEFT refuses it too: ``x`` cannot be factored out of ``B A dropout(x)``),
DoRA, LoRA biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.lora import merge_lora_, unmerge_lora_
from ..functional.moe import moe_lora, peft_expert_factors
from ..serving.exact_merge import check_exact_unmerge, exact_merge_, exact_unmerge_
from .base import AdapterState, init_lora_factors, lora_scaling

__all__ = ["EXPERT_PARAMS", "FusedLoraExperts", "experts_format"]

# The 3-D parameters a fused-experts module holds and the kernels adapt, inner to outer: the
# order PEFT nests its ParamWrappers in (the module's parameter registration order).
EXPERT_PARAMS = ("gate_up_proj", "down_proj")


def experts_format(module: nn.Module) -> dict | None:
    """How ``module`` computes its experts, if it is a fused-experts module the kernels run:
    ``{"activation", "swiglu_alpha", "swiglu_limit", "transposed", "bias"}``; None when it is
    not a fused-experts module; ``ValueError`` (saying why) when it is one the kernels do not
    compute."""
    gu = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    if not (isinstance(gu, torch.Tensor) and isinstance(down, torch.Tensor)):
        return None
    if gu.dim() != 3 or down.dim() != 3:
        return None
    name = type(module).__name__
    if getattr(module, "has_post_expert_norm", False):
        raise ValueError(f"{name}: experts with a post-expert norm are not supported")
    if getattr(module, "has_gate", True) is False:
        raise ValueError(f"{name}: experts without a gate (no gate_up_proj) are not supported")
    if getattr(module, "_is_expert_parallel", False):
        raise ValueError(f"{name}: expert-parallel experts are not supported")
    fmt = {
        "transposed": bool(getattr(module, "is_transposed", False)),
        "bias": getattr(module, "gate_up_proj_bias", None) is not None,
        "swiglu_alpha": 1.702,
        "swiglu_limit": 7.0,
    }
    if (
        hasattr(module, "limit")
        and hasattr(module, "alpha")
        and not getattr(module, "is_concatenated", True)
    ):
        # gpt-oss's _apply_gate: interleaved gate/up, clamped SwiGLU
        fmt.update(
            activation="swiglu_oai",
            swiglu_alpha=float(module.alpha),
            swiglu_limit=float(module.limit),
        )
        return fmt
    act = getattr(module, "act_fn", None)
    if not getattr(module, "is_concatenated", True):
        raise ValueError(f"{name}: interleaved gate/up experts are supported with gpt-oss's gate")
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        raise ValueError(
            f"{name}: the kernels compute SiLU-gated experts (or gpt-oss's clamped SwiGLU); this "
            f"module's activation is {type(act).__name__}"
        )
    fmt["activation"] = "silu"
    return fmt


class FusedLoraExperts(AdapterState, nn.Module):
    """A fused-experts module plus named LoRA adapters on its 3-D parameters (PEFT's
    ``ParamWrapper`` layout and scaling), computed by ``lk.moe_lora``.

    Build it with ``FusedLoraExperts(experts)`` and add adapters with :meth:`add_adapter`; the
    wrapped module stays ``base_layer`` (frozen). The active adapter, set / delete / merge and
    what serving reads are ``AdapterState``'s (``layers/base.py``), as for the dense layers;
    ranks and scales are kept per parameter (``r[param][name]``, ``scaling[param][name]``).
    """

    layer_name = "FusedLoraExperts"
    base_noun = "parameters"

    def __init__(self, experts: nn.Module, *, backend: str = "auto") -> None:
        super().__init__()
        fmt = experts_format(experts)
        if fmt is None:
            raise TypeError(
                f"FusedLoraExperts: expected a fused-experts module with 3-D gate_up_proj and "
                f"down_proj parameters, got {type(experts).__name__}"
            )
        self.base_layer = experts
        for p in experts.parameters():
            p.requires_grad_(False)
        self.format = fmt
        self.num_experts = experts.gate_up_proj.shape[0]
        self.lora_A = nn.ModuleDict({p: nn.ModuleDict() for p in EXPERT_PARAMS})
        self.lora_B = nn.ModuleDict({p: nn.ModuleDict() for p in EXPERT_PARAMS})
        self.r: dict[str, dict[str, int]] = {p: {} for p in EXPERT_PARAMS}
        self.lora_alpha: dict[str, dict[str, float]] = {p: {} for p in EXPERT_PARAMS}
        self.scaling: dict[str, dict[str, float]] = {p: {} for p in EXPERT_PARAMS}
        # _exact_records[name][param][e]: one ExactMergeRecord per expert slice
        self._init_switch_state(backend)

    # ------------------------------------------------------------------------------------
    # adapters
    # ------------------------------------------------------------------------------------

    def features(self, param: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of one expert of ``param``."""
        w = getattr(self.base_layer, param)
        d1, d2 = w.shape[1], w.shape[2]
        return (d1, d2) if self.format["transposed"] else (d2, d1)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.use_rslora)

    def adapter_parameters(self, name: str) -> list[nn.Parameter]:
        """Adapter ``name``'s trainable tensors (its A and B on every adapted parameter)."""
        return [
            t[name].weight
            for p in self.adapter_params(name)
            for t in (self.lora_A[p], self.lora_B[p])
        ]

    def adapter_params(self, name: str) -> list[str]:
        """The parameters adapter ``name`` adapts (inner to outer)."""
        return [p for p in EXPERT_PARAMS if name in self.lora_A[p]]

    def add_adapter(
        self,
        name: str,
        ranks: dict[str, int],
        alphas: dict[str, float],
        *,
        use_rslora: bool = False,
        init_lora_weights: bool | str = True,
    ) -> None:
        """Add adapter ``name`` on the parameters in ``ranks`` (``{"gate_up_proj": r, ...}``,
        ``alphas`` alike): ``lora_A [E r, in]`` and ``lora_B [out, r E]`` per parameter, in the
        parameter's dtype and device (as PEFT's ParamWrapper); ``init_lora_weights`` True or
        "gaussian": B = 0 (the layer starts equal to the base), False: both random."""
        fn = "FusedLoraExperts.add_adapter"
        self._check_new_name(name, init_lora_weights)
        unknown = sorted(set(ranks) - set(EXPERT_PARAMS))
        if unknown or not ranks:
            raise ValueError(
                f"{fn}: expected ranks for some of {list(EXPERT_PARAMS)}, got {sorted(ranks)}"
            )
        for param in ranks:  # every rank checked before any factor is added
            self._check_rank(ranks[param], f"r of {param}")
        for param in EXPERT_PARAMS:
            if param not in ranks:
                continue
            r = ranks[param]
            w = getattr(self.base_layer, param)
            n_in, n_out = self.features(param)
            kw = {"device": w.device, "dtype": w.dtype}
            lora_a = nn.Linear(n_in, r * self.num_experts, bias=False, **kw)
            lora_b = nn.Linear(r * self.num_experts, n_out, bias=False, **kw)
            init_lora_factors(lora_a, lora_b, r, init_lora_weights)
            self.lora_A[param][name] = lora_a
            self.lora_B[param][name] = lora_b
            self.r[param][name] = r
            self.lora_alpha[param][name] = alphas[param]
            self.scaling[param][name] = lora_scaling(alphas[param], r, use_rslora)
        self.__dict__.pop("_mixed_cache", None)
        self._register_name(name, use_rslora)

    def _remove_adapter(self, name: str) -> None:
        for param in EXPERT_PARAMS:
            for table in (self.lora_A[param], self.lora_B[param]):
                if name in table:
                    del table[name]
            for d in (self.r, self.lora_alpha, self.scaling):
                d[param].pop(name, None)
        self.__dict__.pop("_mixed_cache", None)

    def _active_after_delete(self) -> str | None:
        # Deleting the active adapter leaves the experts on their base (the model-level
        # delete_adapter then sets the adapter its layers should run).
        return None

    def expert_factors(self, param: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [E, r, in], b [E, out, r])`` views of adapter ``name``'s factors on ``param``."""
        return peft_expert_factors(
            self.lora_A[param][name].weight, self.lora_B[param][name].weight, self.num_experts
        )

    # ------------------------------------------------------------------------------------
    # merge: W[e] += scaling * B_e A_e per expert, fp32 sums rounded once (merge_lora_);
    # exact=True keeps, per expert, what unmerge() needs to restore every bit
    # ------------------------------------------------------------------------------------

    def _expert_slices(self, param: str):
        """Each expert's slice of ``param`` as an [out, in] view (the merge's orientation)."""
        w = getattr(self.base_layer, param).data
        for e in range(self.num_experts):
            yield w[e].T if self.format["transposed"] else w[e]

    def _expert_operands(self, name: str):
        """``(param, e, w, a_e, b_e, scale)`` of every expert slice adapter ``name`` adapts, the
        factors in the slice's dtype."""
        for param in self.adapter_params(name):
            a, b = self.expert_factors(param, name)
            scale = self.scaling[param][name]
            for e, w in enumerate(self._expert_slices(param)):
                yield param, e, w, a[e].to(w.dtype), b[e].to(w.dtype), scale

    def _merge_adapter(self, name: str, exact: bool) -> None:
        records = {p: [] for p in self.adapter_params(name)}
        with torch.no_grad():
            for param, _, w, ae, be, scale in self._expert_operands(name):
                if exact:
                    records[param].append(exact_merge_(w, ae, be, scale, backend=self.backend))
                else:
                    merge_lora_(w, ae, be, scale, backend=self.backend)
        if exact:
            self._exact_records[name] = records

    def _check_unmerge(self, fn: str = "FusedLoraExperts.unmerge") -> None:
        """Raise, parameters untouched, when an adapter merged with ``exact=True`` cannot be
        taken out bit for bit (its factors changed since the merge): checked for every expert
        before ``unmerge`` changes any."""
        for name in self.merged_adapters:
            records = self._exact_records.get(name)
            if records is None:
                continue
            for param, e, w, ae, be, scale in self._expert_operands(name):
                try:
                    check_exact_unmerge(w, ae, be, scale, records[param][e], fn=fn)
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{param} expert {e}: {err}") from None

    def _unmerge_adapter(self, name: str) -> None:
        records = self._exact_records.pop(name, None)
        with torch.no_grad():
            for param, e, w, ae, be, scale in self._expert_operands(name):
                if records is not None:
                    exact_unmerge_(w, ae, be, scale, records[param][e])
                else:
                    unmerge_lora_(w, ae, be, scale, backend=self.backend)

    def to_base_module(self) -> nn.Module:
        """The wrapped experts module (with whatever is merged into it)."""
        return self.base_layer

    # ------------------------------------------------------------------------------------
    # forward
    # ------------------------------------------------------------------------------------

    def _weights(self):
        base = self.base_layer
        return (
            base.gate_up_proj,
            base.down_proj,
            getattr(base, "gate_up_proj_bias", None) if self.format["bias"] else None,
            getattr(base, "down_proj_bias", None) if self.format["bias"] else None,
        )

    def _call(self, x, top_k_index, top_k_weights, factors, scale, adapter_ids):
        w_gu, w_d, b_gu, b_d = self._weights()
        fmt = self.format
        y = moe_lora(
            x, top_k_index, top_k_weights, w_gu, w_d, *factors, scale,
            bias_gate_up=b_gu, bias_down=b_d, adapter_ids=adapter_ids,
            activation=fmt["activation"], swiglu_alpha=fmt["swiglu_alpha"],
            swiglu_limit=fmt["swiglu_limit"], transposed=fmt["transposed"], backend=self.backend,
        )  # fmt: skip
        return y

    def forward(
        self,
        hidden_states: torch.Tensor,
        top_k_index: torch.Tensor,
        top_k_weights: torch.Tensor,
        adapter_names: list[str] | None = None,
    ) -> torch.Tensor:
        """``hidden_states [T, H]`` with the router's ``top_k_index`` / ``top_k_weights``
        ``[T, k]`` -> ``[T, H]`` with the active adapter; ``adapter_names`` (one per token, or
        one per sequence of equal length: ``T`` a multiple of their number) runs a mixed batch,
        ``"__base__"`` = no adapter."""
        if adapter_names is not None:
            return self._mixed_forward(hidden_states, top_k_index, top_k_weights, adapter_names)
        if self._serving is not None:
            return self._serving.forward(self, hidden_states, top_k_index, top_k_weights)
        return self._active_forward(hidden_states, top_k_index, top_k_weights, self._active_adapter)

    def _active_forward(self, hidden_states, top_k_index, top_k_weights, name):
        """The forward with adapter ``name`` (None: the base experts)."""
        if name is None or self.merged:
            return self.base_layer(hidden_states, top_k_index, top_k_weights)
        factors, scale = self._single_factors(name)
        return self._call(hidden_states, top_k_index, top_k_weights, factors, scale, None)

    def _single_factors(self, name: str):
        """The op's four factors of adapter ``name`` (None where it adapts no parameter) and one
        scale: when gate-up and down scale differently (rank_pattern), the down projection's B
        carries the ratio (autograd gives its weight the right gradient)."""
        out = []
        scale = None
        for param in EXPERT_PARAMS:
            if name not in self.lora_A[param]:
                out += [None, None]
                continue
            a, b = self.expert_factors(param, name)
            s = self.scaling[param][name]
            if scale is None:
                scale = s
            elif s != scale:
                b = b * (s / scale)
            out += [a, b]
        return tuple(out), scale

    def _mixed_forward(self, x, top_k_index, top_k_weights, adapter_names):
        t = x.shape[0]
        count = len(adapter_names) if isinstance(adapter_names, (list, tuple)) else -1
        used = self._check_adapter_names(
            adapter_names,
            count if count > 0 and t % count == 0 else -1,
            f"token or per sequence of equal length ({t} tokens)",
        )
        if not used:
            return self.base_layer(x, top_k_index, top_k_weights)
        index = {n: i for i, n in enumerate(used)}
        ids = self._row_ids([index.get(n, -1) for n in adapter_names], x.device)
        if t != count:  # one name per sequence of t // count tokens
            ids = ids.repeat_interleave(t // count)
        stacks, scales = self._mixed_stacks(used, x.device)
        return self._call(x, top_k_index, top_k_weights, stacks, scales, ids)

    def _mixed_stacks(self, used: list[str], device: torch.device):
        """The op's four ``[L, E, ...]`` factor stacks of the adapters ``used`` (ranks padded to
        the largest with zeros) and their scales, kept while no autograd graph goes through
        them: a decode loop then stacks once, not per step (the stack copies every expert's
        factors of every used adapter, far more than a decode step reads). Reused while the
        adapters, their factors (identity, storage, version counter: an optimizer step or any
        in-place write bumps it) and scalings are unchanged; training (a graph through the
        factors) stacks per call, so the gradients flow back to each adapter's tensors."""
        flat = [
            t[n].weight
            for param in EXPERT_PARAMS
            for n in used
            if n in self.lora_A[param]
            for t in (self.lora_A[param], self.lora_B[param])
        ]
        recording = torch.is_grad_enabled() and any(f.requires_grad for f in flat)
        key = None
        if not (recording or torch.compiler.is_compiling()):
            key = (
                tuple(used),
                tuple((id(f), f.data_ptr(), f._version, f.shape, f.dtype, f.device) for f in flat),
                tuple(tuple(self.scaling[param].get(n) for n in used) for param in EXPERT_PARAMS),
                torch.is_inference_mode_enabled(),
                device,
            )
            hit = self.__dict__.pop("_mixed_cache", None)  # a stale stack is not kept
            if hit is not None and hit[0] == key:
                self.__dict__["_mixed_cache"] = hit
                return hit[1], hit[2]
        elif not torch.compiler.is_compiling():
            self.__dict__.pop("_mixed_cache", None)  # training: nothing kept beside the graph
        stacks = []
        scales = []
        for param in EXPERT_PARAMS:
            names = [n for n in used if n in self.lora_A[param]]
            if not names:
                stacks += [None, None]
                continue
            r_max = max(self.r[param][n] for n in names)
            a_list, b_list = [], []
            for n in used:
                if n in self.lora_A[param]:
                    a, b = self.expert_factors(param, n)
                    pad = r_max - a.shape[1]
                    a_list.append(F.pad(a, (0, 0, 0, pad)) if pad else a)
                    b_list.append(F.pad(b, (0, pad)) if pad else b)
                else:  # this adapter leaves the parameter alone: zero factors
                    n_in, n_out = self.features(param)
                    like = self.lora_A[param][names[0]].weight
                    a_list.append(like.new_zeros(self.num_experts, r_max, n_in))
                    b_list.append(like.new_zeros(self.num_experts, n_out, r_max))
            stacks += [torch.stack(a_list), torch.stack(b_list)]
        # one scale per adapter: gate-up's where it has one; the down B carries any ratio
        for n in used:
            s_gu = self.scaling["gate_up_proj"].get(n)
            s_d = self.scaling["down_proj"].get(n)
            scales.append(s_gu if s_gu is not None else s_d)
        if stacks[2] is not None:
            ratio = [
                (self.scaling["down_proj"].get(n, s) / s) if s else 1.0
                for n, s in zip(used, scales, strict=True)
            ]
            if any(v != 1.0 for v in ratio):
                stacks[3] = (
                    stacks[3]
                    * torch.tensor(ratio, device=device).to(stacks[3].dtype)[:, None, None, None]
                )
        if key is not None:
            self.__dict__["_mixed_cache"] = (key, stacks, scales)
        return stacks, scales

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names}, active={self._active_adapter!r}, " + ", ".join(
            f"{k}={v}" for k, v in self.format.items()
        )
