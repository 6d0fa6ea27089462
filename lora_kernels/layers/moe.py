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

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..functional.lora import merge_lora_, unmerge_lora_
from ..functional.moe import moe_lora, peft_expert_factors
from ..serving.exact_merge import (
    ExactMergeRecord,
    check_exact_unmerge,
    exact_merge_,
    exact_unmerge_,
)
from .base import BASE_ADAPTER, SharedActive, lora_scaling

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


class FusedLoraExperts(nn.Module):
    """A fused-experts module plus named LoRA adapters on its 3-D parameters (PEFT's
    ``ParamWrapper`` layout and scaling), computed by ``lk.moe_lora``.

    Build it with ``FusedLoraExperts(experts)`` and add adapters with :meth:`add_adapter`; the
    wrapped module stays ``base_layer`` (frozen).
    """

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
        self.use_rslora: dict[str, bool] = {}
        self.merged_adapters: list[str] = []
        self._exact_records: dict[str, dict[str, list[ExactMergeRecord]]] = {}
        self._active_adapter: str | None = None
        self.backend = backend
        # Serving from an AdapterCache's device slots (lora_kernels.serving.state): while set,
        # the model-level state, not _active_adapter, says which adapter (or slot per row) runs.
        self._serving = None

    # The active adapter: the layer's own, or while it follows its model's SharedActive the
    # model's (if this layer has it), as LoraLayer does for the dense layers.
    @property
    def _active_adapter(self) -> str | None:
        d = self.__dict__
        shared = d.get("_shared_active")
        if shared is None:
            return d.get("_own_active")
        name = shared.name
        return name if name in self.use_rslora else None

    @_active_adapter.setter
    def _active_adapter(self, name: str | None) -> None:
        d = self.__dict__
        shared = d.pop("_shared_active", None)
        if shared is not None:
            shared.synced = False
        d["_own_active"] = name

    def _follow(self, shared: SharedActive) -> None:
        """Read the active adapter from ``shared`` from now on (``switch_adapter`` calls it)."""
        self.__dict__["_shared_active"] = shared

    def _unsync_shared(self) -> None:
        shared = self.__dict__.get("_shared_active")
        if shared is not None:
            shared.synced = False

    def _leave_serving(self) -> None:
        """Stop reading the model's serving state, keeping the adapter it selected as this
        layer's own; called before anything that changes the layer's adapter by itself."""
        serving = self._serving
        if serving is not None:
            self._active_adapter = serving.active_adapter(self)
            self._serving = None
            serving.leave()

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

    @property
    def active_adapter(self) -> str | None:
        if self._serving is not None:
            return self._serving.active_adapter(self)
        return self._active_adapter

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

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
        if not isinstance(name, str) or not name or name == BASE_ADAPTER or "." in name:
            raise ValueError(
                f"{fn}: expected name to be a non-empty str without '.', other than "
                f"{BASE_ADAPTER!r}, got {name!r}"
            )
        if name in self.use_rslora:
            raise ValueError(f"{fn}: adapter {name!r} already exists; delete_adapter it first")
        unknown = sorted(set(ranks) - set(EXPERT_PARAMS))
        if unknown or not ranks:
            raise ValueError(
                f"{fn}: expected ranks for some of {list(EXPERT_PARAMS)}, got {sorted(ranks)}"
            )
        if init_lora_weights not in (True, False, "gaussian"):
            raise ValueError(
                f"{fn}: expected init_lora_weights in (True, False, 'gaussian'), "
                f"got {init_lora_weights!r}"
            )
        for param in EXPERT_PARAMS:
            if param not in ranks:
                continue
            r = ranks[param]
            if isinstance(r, bool) or not isinstance(r, int) or r < 1:
                raise ValueError(f"{fn}: expected r of {param} to be a positive int, got {r!r}")
            w = getattr(self.base_layer, param)
            n_in, n_out = self.features(param)
            kw = {"device": w.device, "dtype": w.dtype}
            lora_a = nn.Linear(n_in, r * self.num_experts, bias=False, **kw)
            lora_b = nn.Linear(r * self.num_experts, n_out, bias=False, **kw)
            with torch.no_grad():
                if init_lora_weights is True:
                    nn.init.kaiming_uniform_(lora_a.weight, a=math.sqrt(5))
                    nn.init.zeros_(lora_b.weight)
                elif init_lora_weights == "gaussian":
                    nn.init.normal_(lora_a.weight, std=1.0 / r)
                    nn.init.zeros_(lora_b.weight)
            self.lora_A[param][name] = lora_a
            self.lora_B[param][name] = lora_b
            self.r[param][name] = r
            self.lora_alpha[param][name] = alphas[param]
            self.scaling[param][name] = lora_scaling(alphas[param], r, use_rslora)
        self._unsync_shared()  # the model's set of adapter names changed
        self.__dict__.pop("_mixed_cache", None)
        self.use_rslora[name] = bool(use_rslora)
        if self._active_adapter is None:
            self._active_adapter = name

    def _check_known(self, fn: str, name: str) -> None:
        if name not in self.use_rslora:
            raise ValueError(
                f"FusedLoraExperts.{fn}: unknown adapter {name!r}; this layer has "
                f"{self.adapter_names}"
            )

    def set_adapter(self, name: str | None) -> None:
        """Make ``name`` the active adapter (None: base only); the layer must not be merged."""
        if name is not None:
            self._check_known("set_adapter", name)
        self._leave_serving()
        if self.merged and name != self._active_adapter:
            raise RuntimeError(
                f"FusedLoraExperts.set_adapter: {self.merged_adapters} is merged; unmerge() first"
            )
        self._active_adapter = name

    def delete_adapter(self, name: str) -> None:
        self._check_known("delete_adapter", name)
        self._leave_serving()
        self._unsync_shared()
        if name in self.merged_adapters:
            raise RuntimeError(
                f"FusedLoraExperts.delete_adapter: {name!r} is merged; unmerge() first"
            )
        for param in EXPERT_PARAMS:
            for table in (self.lora_A[param], self.lora_B[param]):
                if name in table:
                    del table[name]
            for d in (self.r, self.lora_alpha, self.scaling):
                d[param].pop(name, None)
        del self.use_rslora[name]
        self.__dict__.pop("_mixed_cache", None)
        if self._active_adapter == name:
            self._active_adapter = None

    def expert_factors(self, param: str, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a [E, r, in], b [E, out, r])`` views of adapter ``name``'s factors on ``param``."""
        return peft_expert_factors(
            self.lora_A[param][name].weight, self.lora_B[param][name].weight, self.num_experts
        )

    # ------------------------------------------------------------------------------------
    # merge
    # ------------------------------------------------------------------------------------

    def _expert_slices(self, param: str):
        """Each expert's slice of ``param`` as an [out, in] view (the merge's orientation)."""
        w = getattr(self.base_layer, param).data
        for e in range(self.num_experts):
            yield w[e].T if self.format["transposed"] else w[e]

    def merge(self, adapter_name: str | None = None, exact: bool = False) -> None:
        """Fold ``adapter_name`` (default: the active adapter) into the experts' parameters in
        place: ``W[e] += scaling * B_e A_e`` per expert, fp32 sums rounded once
        (``merge_lora_``); ``exact=True`` keeps what ``unmerge()`` needs to restore every bit."""
        name = self._active_adapter if adapter_name is None else adapter_name
        if name is None:
            raise ValueError("FusedLoraExperts.merge: no adapter to merge (no active adapter)")
        self._check_known("merge", name)
        if name in self.merged_adapters:
            raise RuntimeError(f"FusedLoraExperts.merge: adapter {name!r} is already merged")
        self._leave_serving()
        records = {}
        with torch.no_grad():
            for param in self.adapter_params(name):
                a, b = self.expert_factors(param, name)
                scale = self.scaling[param][name]
                rec = []
                for e, w in enumerate(self._expert_slices(param)):
                    ae, be = a[e].to(w.dtype), b[e].to(w.dtype)
                    if exact:
                        rec.append(exact_merge_(w, ae, be, scale, backend=self.backend))
                    else:
                        merge_lora_(w, ae, be, scale, backend=self.backend)
                records[param] = rec
        if exact:
            self._exact_records[name] = records
        self.merged_adapters.append(name)
        self._active_adapter = name

    def _check_unmerge(self, fn: str = "FusedLoraExperts.unmerge") -> None:
        """Raise, parameters untouched, when an adapter merged with ``exact=True`` cannot be
        taken out bit for bit (its factors changed since the merge): checked for every expert
        before ``unmerge`` changes any."""
        for name in self.merged_adapters:
            records = self._exact_records.get(name)
            if records is None:
                continue
            for param in self.adapter_params(name):
                a, b = self.expert_factors(param, name)
                scale = self.scaling[param][name]
                for e, w in enumerate(self._expert_slices(param)):
                    ae, be = a[e].to(w.dtype), b[e].to(w.dtype)
                    try:
                        check_exact_unmerge(w, ae, be, scale, records[param][e], fn=fn)
                    except (TypeError, ValueError) as err:
                        raise ValueError(f"{param} expert {e}: {err}") from None

    def unmerge(self) -> None:
        """Take every merged adapter out of the parameters again (in reverse order); one merged
        with ``exact=True`` gives back the parameters bit for bit (checked for every expert
        first: a refused unmerge changes nothing)."""
        self._check_unmerge()
        with torch.no_grad():
            while self.merged_adapters:
                name = self.merged_adapters[-1]
                records = self._exact_records.pop(name, None)
                for param in self.adapter_params(name):
                    a, b = self.expert_factors(param, name)
                    scale = self.scaling[param][name]
                    for e, w in enumerate(self._expert_slices(param)):
                        ae, be = a[e].to(w.dtype), b[e].to(w.dtype)
                        if records is not None:
                            exact_unmerge_(w, ae, be, scale, records[param][e])
                        else:
                            unmerge_lora_(w, ae, be, scale, backend=self.backend)
                self.merged_adapters.pop()

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
        fn = "FusedLoraExperts.forward"
        if self.merged:
            raise RuntimeError(
                f"{fn}: adapter_names cannot be used while {self.merged_adapters} is merged; "
                "unmerge() first"
            )
        if not isinstance(adapter_names, (list, tuple)) or not all(
            isinstance(n, str) for n in adapter_names
        ):
            raise TypeError(f"{fn}: expected adapter_names to be a list of str")
        t, count = x.shape[0], len(adapter_names)
        if count == 0 or t % count:
            raise ValueError(
                f"{fn}: expected one adapter name per token or per sequence ({t} tokens), got "
                f"{count} names"
            )
        unknown = sorted(
            {n for n in adapter_names if n != BASE_ADAPTER and n not in self.use_rslora}
        )
        if unknown:
            raise ValueError(
                f"{fn}: unknown adapter names {unknown}; this layer has {self.adapter_names} "
                f"(and {BASE_ADAPTER!r} for none)"
            )
        used = list(dict.fromkeys(n for n in adapter_names if n != BASE_ADAPTER))
        if not used:
            return self.base_layer(x, top_k_index, top_k_weights)
        index = {n: i for i, n in enumerate(used)}
        ids = torch.tensor([index.get(n, -1) for n in adapter_names], device=x.device)
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
