"""MoE expert LoRA: one layer's experts, ours (``FusedLoraExperts``, ``lk.moe_lora``) against
PEFT's ``target_parameters`` (``ParamWrapper``, which adds ``delta W`` to every expert's weight
on every forward) and the base experts without LoRA.

Per provider: forward (no grad) and forward + backward time (``torch.utils.benchmark.Timer``,
``blocked_autorange``: the median of blocks), at a prefill shape and at decode token counts, and
the peak memory a training step needs beyond what exists before it (a subprocess per provider:
``/proc/self`` high-water mark on a CPU, ``max_memory_allocated`` on a GPU). ``--train`` adds a
20-step training run of a tiny Qwen3-MoE (attention and experts adapted), PEFT vs ours from the
same initial adapter: both loss curves and the time per step. ``decode_mixed``: a serving decode
step whose tokens take ``--mixed-adapters`` (4) adapters in turn, as a share of the base experts'
no-LoRA throughput (the GPU target: >= 0.9).

    python -m benchmarks.bench_moe                 # 64 experts, H 1024, I 384, r 16, top-8
    python -m benchmarks.bench_moe --quick --train

Results: ``benchmarks/results/bench_moe_<device>.json`` (machine, versions, commit) and a plot
beside it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.bench import device_name
from lora_kernels.layers.moe import FusedLoraExperts

PROVIDERS = ("base experts (no LoRA)", "PEFT target_parameters", "ours")
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]
ROOT = Path(__file__).resolve().parents[1]


class Block(nn.Module):
    """What PEFT needs around an experts module (a parent to name its parameters)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        self.experts = experts

    def forward(self, x, ids, weights):
        return self.experts(x, ids, weights)


def make_experts(args, device):
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    cfg = Qwen3MoeConfig(
        hidden_size=args.hidden, moe_intermediate_size=args.inter, num_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )  # fmt: skip
    cfg._experts_implementation = args.impl
    torch.manual_seed(0)
    experts = Qwen3MoeExperts(cfg)
    with torch.no_grad():
        experts.gate_up_proj.normal_(0, args.hidden**-0.5)
        experts.down_proj.normal_(0, args.inter**-0.5)
    experts.requires_grad_(False)
    return experts.to(device)


def build(name: str, args, device) -> nn.Module:
    """The provider's experts module (callable as ``(x, ids, weights)``), same weights."""
    import peft

    experts = make_experts(args, device)
    if name == PROVIDERS[0]:
        return experts
    cfg = peft.LoraConfig(r=args.r, lora_alpha=2 * args.r, target_parameters=TARGETS,
                          target_modules=[], init_lora_weights=False)  # fmt: skip
    torch.manual_seed(1)
    pm = peft.get_peft_model(Block(experts), cfg)
    wrapper = pm.base_model.model.experts
    if name == PROVIDERS[1]:
        return wrapper
    ours = FusedLoraExperts(make_experts(args, device))
    r = {"gate_up_proj": args.r, "down_proj": args.r}
    ours.add_adapter("default", r, {k: 2 * v for k, v in r.items()})
    with torch.no_grad():  # PEFT's factors: outer wrapper down_proj, inner gate_up_proj
        for param, w in (("down_proj", wrapper), ("gate_up_proj", wrapper.base_layer)):
            ours.lora_A[param]["default"].weight.copy_(w.lora_A["default"].weight)
            ours.lora_B[param]["default"].weight.copy_(w.lora_B["default"].weight)
    return ours


def with_adapters(ours: FusedLoraExperts, count: int) -> list[str]:
    """Give ``ours`` ``count`` adapters in all (``default`` and random others of its rank and
    scale) and return their names: a serving batch mixes them token by token."""
    names = ["default"] + [f"a{i}" for i in range(1, count)]
    r = {p: ours.lora_A[p]["default"].weight.shape[0] // ours.num_experts for p in ours.lora_A}
    for i, name in enumerate(names[1:], start=3):
        ours.add_adapter(name, r, {k: 2 * v for k, v in r.items()})
        torch.manual_seed(i)
        with torch.no_grad():
            for param in ours.lora_A:
                for f in (ours.lora_A[param][name].weight, ours.lora_B[param][name].weight):
                    f.normal_(0, f.shape[-1] ** -0.5)
    return names


def inputs(t: int, args, device):
    torch.manual_seed(2)
    x = torch.randn(t, args.hidden, device=device)
    logits = torch.randn(t, args.experts, device=device)
    weights, ids = torch.topk(logits.softmax(-1), args.top_k, dim=-1)
    return (
        x,
        ids,
        weights / weights.sum(-1, keepdim=True),
        torch.randn(t, args.hidden, device=device),
    )


def step_fn(module, x, ids, weights, dy):
    x = x.detach().requires_grad_(True)

    def step():
        y = module(x, ids, weights)
        y.backward(dy)

    return step


def forward_fn(module, x, ids, weights):
    def run():
        with torch.no_grad():
            module(x, ids, weights)

    return run


def timed(fn, min_run_time: float, device) -> dict:
    from torch.utils.benchmark import Timer

    fn()  # warm-up: lazy imports, caches
    m = Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    return {"median_s": m.median, "iqr_s": m.iqr, "runs": len(m.times)}


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}")


def measure_peak(name: str, args, device) -> int:
    """Bytes a training step of ``name`` needs at its peak beyond what exists before it."""
    module = build(name, args, device)
    step = step_fn(module, *inputs(args.tokens, args, device))
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # the resident high-water mark back to the current RSS
    before = _status_bytes("VmRSS")
    step()
    return _status_bytes("VmHWM") - before


def peak_in_subprocess(name: str, argv: list[str]) -> int | None:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")  # freed blocks go back to the OS
    cmd = [sys.executable, "-m", "benchmarks.bench_moe", *argv, "--memory-of", name]
    out = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        print(f"{name}: memory run failed: {out.stderr.strip()[-400:]}", file=sys.stderr)
        return None
    return int(out.stdout.strip().splitlines()[-1])


def train_comparison(args, device, steps: int = 20) -> dict:
    """A tiny Qwen3-MoE (q/v projections and both expert projections adapted), PEFT vs ours
    from the same initial adapter, AdamW, the same batches: loss per step, seconds per step."""
    import peft
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    cfg = Qwen3MoeConfig(
        vocab_size=512, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        num_experts=16, num_experts_per_tok=4, decoder_sparse_step=1,
    )  # fmt: skip
    torch.manual_seed(0)
    base = Qwen3MoeForCausalLM(cfg).to(device)
    pcfg = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                           target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
                           init_lora_weights=False)  # fmt: skip
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg)
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        theirs.save_pretrained(d)
        ours = lk.load_adapter(copy.deepcopy(base), d, is_trainable=True)
    batches = [torch.randint(0, 512, (4, 64), device=device) for _ in range(steps)]
    out = {}
    for name, model in (("PEFT target_parameters", theirs), ("ours", ours)):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        losses, times = [], []
        for ids in batches:
            t0 = time.perf_counter()
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
            losses.append(loss.item())
        out[name] = {
            "losses": losses,
            "median_step_s": sorted(times[2:])[len(times[2:]) // 2],
            "trainable": sum(p.numel() for p in params),
        }
    diff = max(
        abs(a - b)
        for a, b in zip(out["ours"]["losses"], out["PEFT target_parameters"]["losses"], strict=True)
    )
    out["max_abs_loss_difference"] = diff
    return out


def plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot", file=sys.stderr)
        return
    s = result["shape"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    colors = {PROVIDERS[0]: "tab:gray", PROVIDERS[1]: "tab:red", PROVIDERS[2]: "tab:blue"}
    prefill = result["prefill"]
    names = list(prefill)
    for ax, mode in zip(axes[:2], ("fwd", "fwd+bwd"), strict=True):
        vals = [prefill[n][mode]["median_s"] * 1e3 for n in names]
        ax.barh(names[::-1], vals[::-1], color=[colors[n] for n in names[::-1]])
        ax.set_xlabel(f"ms per {mode} (median), T={s['tokens']}")
    for n in names:
        ts = sorted(int(t) for t in result["decode"])
        vals = [result["decode"][str(t)][n]["fwd"]["median_s"] * 1e3 for t in ts]
        axes[2].plot(ts, vals, marker="o", color=colors[n], label=n)
    axes[2].set_xlabel("decode tokens T")
    axes[2].set_ylabel("ms per forward")
    axes[2].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.suptitle(
        f"MoE layer experts: E={s['experts']} H={s['hidden']} I={s['inter']} top-{s['top_k']} "
        f"r={s['r']} fp32, {result['device']}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--inter", type=int, default=384)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--decode", type=int, nargs="*", default=[1, 4, 16])
    parser.add_argument(
        "--mixed-adapters", type=int, default=4, help="adapters of the mixed decode batch"
    )
    parser.add_argument("--impl", default="eager", help="transformers' experts implementation")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--quick", action="store_true", help="0.3 s per measurement (not 1 s), decode T=1 and 16"
    )
    parser.add_argument("--train", action="store_true", help="add the 20-step training run")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if args.memory_of:
        print(measure_peak(args.memory_of, args, device))
        return 0
    import peft
    import transformers

    min_run = 0.3 if args.quick else 1.0
    if args.quick:
        args.decode = [t for t in args.decode if t in (1, 16)] or args.decode[:1]
    modules = {name: build(name, args, device) for name in PROVIDERS}
    x, ids, w, dy = inputs(args.tokens, args, device)
    with torch.no_grad():  # same weights, same math: outputs agree before anything is timed
        want = modules[PROVIDERS[1]](x, ids, w)
        torch.testing.assert_close(modules["ours"](x, ids, w), want, rtol=1e-4, atol=1e-4)
    result = {
        "device": device_name(device),
        "machine": platform.platform(),
        "threads": torch.get_num_threads(),
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "peft": peft.__version__,
            "python": platform.python_version(),
        },  # fmt: skip
        "commit": _commit(),
        "shape": {
            "experts": args.experts,
            "hidden": args.hidden,
            "inter": args.inter,
            "top_k": args.top_k,
            "r": args.r,
            "tokens": args.tokens,
            "dtype": "fp32",
            "experts_implementation": args.impl,
        },  # fmt: skip
        "timer": f"torch.utils.benchmark.Timer.blocked_autorange(min_run_time={min_run})",
        "prefill": {},
        "decode": {},
        "decode_mixed": {},
    }
    for name, module in modules.items():
        result["prefill"][name] = {
            "fwd": timed(forward_fn(module, x, ids, w), min_run, device),
            "fwd+bwd": timed(step_fn(module, x, ids, w, dy), min_run, device),
        }
        print(
            name, {k: f"{v['median_s'] * 1e3:.2f} ms" for k, v in result["prefill"][name].items()}
        )
    for t in args.decode:
        xt, it, wt, dyt = inputs(t, args, device)
        result["decode"][str(t)] = {
            name: {
                "fwd": timed(forward_fn(m, xt, it, wt), min_run, device),
                "fwd+bwd": timed(step_fn(m, xt, it, wt, dyt), min_run, device),
            }
            for name, m in modules.items()
        }
        print(
            f"decode T={t}",
            {
                n: f"{v['fwd']['median_s'] * 1e3:.2f} ms"
                for n, v in result["decode"][str(t)].items()
            },
        )
    # serving: a decode batch whose tokens use 4 adapters (a mixed batch), as no-LoRA throughput
    ours, base = modules["ours"], modules[PROVIDERS[0]]
    names = with_adapters(ours, args.mixed_adapters)
    for t in args.decode:
        xt, it, wt, _ = inputs(t, args, device)
        per_token = [names[i % len(names)] for i in range(t)]

        def mixed(xt=xt, it=it, wt=wt, per_token=per_token, ours=ours):
            with torch.no_grad():
                ours(xt, it, wt, adapter_names=per_token)

        row = {
            "base": timed(forward_fn(base, xt, it, wt), min_run, device),
            "ours mixed": timed(mixed, min_run, device),
            "adapters": len(names),
        }
        row["throughput_vs_base"] = row["base"]["median_s"] / row["ours mixed"]["median_s"]
        result["decode_mixed"][str(t)] = row
        print(f"decode T={t}, {len(names)} adapters mixed: "
              f"{row['throughput_vs_base']:.2f} of the no-LoRA throughput")  # fmt: skip
    del modules, ours, base
    sub_argv = [a for a in argv if a not in ("--train", "--quick")]
    for name in PROVIDERS:  # a GPU counts its own allocations: no subprocess needed there
        peak = (
            measure_peak(name, args, device)
            if device.type == "cuda"
            else peak_in_subprocess(name, sub_argv)
        )
        result["prefill"][name]["peak_step_bytes"] = peak
    if args.train:
        result["train"] = train_comparison(args, device)
        print(
            "train",
            {
                n: v if not isinstance(v, dict) else v["median_step_s"]
                for n, v in result["train"].items()
            },
        )
    out = args.out or ROOT / "benchmarks" / "results" / f"bench_moe_{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out.with_suffix(".png"))
    for name in PROVIDERS:
        r = result["prefill"][name]
        peak = (r["peak_step_bytes"] or 0) / 2**20
        print(f"{name}: fwd+bwd {r['fwd+bwd']['median_s'] * 1e3:.1f} ms, peak step {peak:.0f} MiB")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
