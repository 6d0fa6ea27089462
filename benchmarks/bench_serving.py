"""Serving from device slots: what a switch and a mixed-adapter step cost with the model state.

Three questions (``lora_kernels.serving``):

1. **Switch time vs the number of adapted layers** (8 to 800 tiny ``FusedLoraLinear`` layers,
   16 x 16, four rank-4 adapters installed): an unmerged ``switch_adapter(model, name,
   cache=cache)`` of a model served from the cache's slots (one write to the model's state), next
   to the per-layer switch (the same model and adapters without slots: ``set_adapter`` on every
   layer, the only unmerged route before the state). Target on CPU: flat, < 50 us per switch.
2. **Mixed-batch overhead per step** on a small Llama (transformers ``LlamaConfig``, no download)
   with LoRA on every projection: a decode-shaped step (B sequences of one token, no KV cache)
   with one adapter, in both step flavours (``graph_safe`` False: the layer's own fused path on
   the slot views; True: ``lora_linear_multi`` on device ids, what CUDA runs), and with B
   distinct adapters through the state (names, or a ready id tensor) and through the per-layer
   path (the names handed to every layer, each building its ids).
3. **Many adapters**: 1000 rank-16 adapters registered on that Llama (cache, one slot each,
   installed by a first switch), random mixed batches: time per step and memory.
4. On CUDA: a decode step of 64 sequences with 64 distinct adapters captured in a CUDA graph,
   against the captured step of the same Llama without LoRA (GPU target: within 1.5x).

    python benchmarks/bench_serving.py [--threads 1] [--adapters 1000] [--quick] [--out PATH]

``benchmarks/bench_switch.py --serving`` runs this script. Prints tables, writes JSON (default
``benchmarks/results/bench_serving_<device>.json``) and, with matplotlib, a PNG of question 1.
Timings: ``lora_kernels.bench`` (median, p20, p80).
"""

from __future__ import annotations

import argparse
import datetime
import re
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.bench import (
    device_name,
    time_calls,
    time_side_by_side,
    timing_rows,
    write_results,
)
from lora_kernels.models.model import LoraConfig, get_lora_model, mixed_batch
from lora_kernels.serving.cache import AdapterCache
from lora_kernels.serving.state import adapter_slot_ids, serving_state
from lora_kernels.serving.switch import switch_adapter

RESULTS = Path(__file__).resolve().parent / "results"
STACK_TARGETS = r"layers\.\d+"
LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def random_adapter(model: nn.Module, r: int, target_modules, std: float = 0.05):
    """A PEFT-keyed state dict of random A and B (B non-zero) for every FusedLoraLinear layer of
    ``model``, and its config."""
    sd = {}
    for path, m in model.named_modules():
        if isinstance(m, lk.FusedLoraLinear):
            sd[f"base_model.model.{path}.lora_A.weight"] = torch.randn(r, m.in_features) * std
            sd[f"base_model.model.{path}.lora_B.weight"] = torch.randn(m.out_features, r) * std
    return sd, LoraConfig(r=r, lora_alpha=2 * r, target_modules=target_modules)


def summary(timing: dict) -> dict:
    return {k: timing[k] for k in ("median_s", "p20_s", "p80_s", "n")}


def us(s: float) -> str:
    return f"{s * 1e6:.1f} us" if s < 1e-3 else f"{s * 1e3:.2f} ms"


# ---------------------------------------------------------------------------------------------
# 1. switch time vs number of adapted layers
# ---------------------------------------------------------------------------------------------


class Stack(nn.Module):
    def __init__(self, layers: int, dim: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def switch_vs_layers(counts: list[int], rounds: int, device) -> list[dict]:
    names = ["a", "b", "c", "d"]
    rows = []
    for count in counts:
        per_route = {}
        for route in ("served", "per-layer"):
            torch.manual_seed(0)
            model = Stack(count, 16).to(device)
            get_lora_model(model, LoraConfig(r=4, target_modules=STACK_TARGETS))
            cache = AdapterCache(1 << 30)
            for name in names:
                cache.put(name, *random_adapter(model, 4, STACK_TARGETS))
            if route == "served":
                cache.attach(model, num_slots=len(names), max_rank=4)
            for name in names:  # installs each (a copy, or a view into its slot)
                switch_adapter(model, name, cache=cache)
            assert (serving_state(model) is not None) == (route == "served")

            def switch(i, model=model, cache=cache):
                switch_adapter(model, names[i % len(names)], cache=cache)

            # The per-layer route takes milliseconds at hundreds of layers: fewer rounds there.
            n = rounds if route == "served" else max(20, rounds * 8 // count)
            per_route[route] = summary(time_calls(switch, n, warmup=8, device=device))
        rows.append({"layers": count, **{k: v for k, v in per_route.items()}})
        print(
            f"  {count:>4} layers: served {us(per_route['served']['median_s']):>10}   "
            f"per-layer {us(per_route['per-layer']['median_s']):>10}",
            flush=True,
        )
    return rows


# ---------------------------------------------------------------------------------------------
# 2. and 3. a small Llama
# ---------------------------------------------------------------------------------------------


def small_llama(hidden: int, layers: int, device) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=max(1, hidden // 32),
        num_key_value_heads=max(1, hidden // 64),
        max_position_embeddings=64,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device).eval()
    return get_lora_model(model, LoraConfig(r=4, target_modules=LLAMA_TARGETS))


def served_llama(num_adapters: int, rank: int, hidden: int, layers: int, device):
    """A small Llama with ``num_adapters`` adapters in a cache, one slot each, all installed."""
    model = small_llama(hidden, layers, device)
    cache = AdapterCache(1 << 34)
    names = [f"ad{i}" for i in range(num_adapters)]
    t0 = time.perf_counter()
    for name in names:
        cache.put(name, *random_adapter(model, rank, LLAMA_TARGETS))
    cache.attach(model, num_slots=num_adapters, max_rank=rank)
    t1 = time.perf_counter()
    for name in names:
        switch_adapter(model, name, cache=cache)
    t2 = time.perf_counter()
    return model, cache, names, {"cache_put_s": t1 - t0, "install_s": t2 - t1}


def step_providers(model, cache, names, batch: int, seed: int = 0) -> dict:
    """Per-step callables: a decode-shaped forward (batch sequences of one token)."""
    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    tokens = torch.randint(0, 256, (batch, 1), generator=gen).to(device)
    state = serving_state(model)
    picks = torch.randint(0, len(names), (batch,), generator=gen).tolist()
    mixed_names = [names[i] for i in picks]
    ids = adapter_slot_ids(model, mixed_names)

    def run():
        with torch.no_grad():
            model(tokens)

    def flavour(graph_safe: bool, name: str | None):
        def step():
            state.graph_safe = graph_safe
            switch_adapter(model, name, cache=cache)
            run()

        return step

    def mixed_by(arg, per_layer: bool = False):
        def step():
            state.graph_safe = device.type == "cuda"
            if per_layer:  # the names handed to every layer (the path before the state)
                state.synced = False
            try:
                with mixed_batch(model, arg):
                    run()
            finally:
                state.synced = True

        return step

    return {
        "base model": flavour(False, None),
        "one adapter": flavour(False, names[0]),
        "one adapter, graph-safe ids": flavour(True, names[0]),
        f"{len(set(picks))} adapters, names -> state": mixed_by(mixed_names),
        f"{len(set(picks))} adapters, id tensor -> state": mixed_by(ids),
        f"{len(set(picks))} adapters, names -> every layer": mixed_by(mixed_names, True),
    }


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def slot_bytes(cache: AdapterCache, model: nn.Module) -> int:
    total = 0
    for path, m in model.named_modules():
        if isinstance(m, lk.FusedLoraLinear):
            total += sum(t.numel() * t.element_size() for t in cache.slot_tensors(path))
    return total


def llama_steps(args, device, num_adapters: int, batches: list[int]) -> dict:
    rss0 = rss_mib()
    model, cache, names, setup = served_llama(
        num_adapters, args.rank, args.hidden, args.llama_layers, device
    )
    rss1 = rss_mib()
    layers = sum(1 for m in model.modules() if isinstance(m, lk.FusedLoraLinear))
    result = {
        "adapters": num_adapters,
        "rank": args.rank,
        "hidden": args.hidden,
        "decoder_layers": args.llama_layers,
        "adapted_layers": layers,
        "slot_bytes": slot_bytes(cache, model),
        "rss_growth_mib": rss1 - rss0,
        **setup,
        "batches": {},
    }
    print(
        f"  {num_adapters} adapters (r={args.rank}) on {layers} layers: slots "
        f"{result['slot_bytes'] / 2**20:.1f} MiB, process RSS +{rss1 - rss0:.0f} MiB, "
        f"put {setup['cache_put_s']:.1f} s, installed in {setup['install_s']:.1f} s",
        flush=True,
    )
    for batch in batches:
        providers = step_providers(model, cache, names, batch)
        timings = time_side_by_side(providers, rounds=args.rounds, warmup=2)
        single = timings["one adapter"]["median_s"]
        rows = {
            name: {**summary(t), "vs_one_adapter": t["median_s"] / single}
            for name, t in timings.items()
        }
        result["batches"][str(batch)] = rows
        print(f"  batch {batch}:")
        for name, row in rows.items():
            print(
                f"    {name:<40} {us(row['median_s']):>10}  ({row['vs_one_adapter']:.2f}x one "
                "adapter)",
                flush=True,
            )
    return result


def _capture(fn):
    """``fn`` captured in a CUDA graph after a warm-up on a side stream."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        fn()
    return graph


def captured_steps(args, device, num_adapters: int = 64, batch: int = 64) -> dict:
    """CUDA only: a decode step of ``batch`` sequences with ``num_adapters`` distinct adapters,
    captured in a CUDA graph, against the captured step of the same Llama without LoRA (the
    issue's GPU target: within 1.5x)."""
    model, cache, names, _ = served_llama(
        num_adapters, args.rank, args.hidden, args.llama_layers, device
    )
    from transformers import LlamaForCausalLM

    plain = LlamaForCausalLM(model.config).to(device).eval()
    tokens = torch.randint(0, 256, (batch, 1), device=device)
    ids = adapter_slot_ids(model, [names[i % num_adapters] for i in range(batch)])
    base_graph = _capture(lambda: plain(tokens, use_cache=False))
    with mixed_batch(model, ids):
        mixed_graph = _capture(lambda: model(tokens, use_cache=False))
        timings = time_side_by_side(
            {"base model, captured": base_graph.replay, "mixed, captured": mixed_graph.replay},
            cuda=True,
            rounds=args.rounds,
        )
    ratio = timings["mixed, captured"]["median_s"] / timings["base model, captured"]["median_s"]
    print(f"  captured decode step, {batch} sequences, {num_adapters} distinct adapters:")
    for name, t in timings.items():
        print(f"    {name:<40} {us(t['median_s']):>10}")
    print(f"    ratio {ratio:.2f}x (target <= 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")
    return {**{k: summary(v) for k, v in timings.items()}, "ratio": ratio, "batch": batch}


def plot(rows: list[dict], path: Path, title: str, device) -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _plot

    if not _plot.available():
        return False
    fig, (ax,) = _plot.figure(1, width=6, height=4)
    series = {
        route: [r[route]["median_s"] * 1e6 for r in rows] for route in ("served", "per-layer")
    }
    _plot.lines(ax, [r["layers"] for r in rows], series, xlabel="adapted layers",
                ylabel="us per unmerged switch (median)", logx=True, logy=True)  # fmt: skip
    _plot.save(fig, path, title, device=device)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (0: torch's default)")
    parser.add_argument("--adapters", type=int, default=1000, help="for question 3")
    parser.add_argument("--rank", type=int, default=16, help="rank of the Llama adapters")
    parser.add_argument("--hidden", type=int, default=64, help="the small Llama's hidden size")
    parser.add_argument("--llama-layers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per row")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and adapters")
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (20 if args.quick else 100)
    if args.quick:
        args.adapters = min(args.adapters, 100)
    started = time.perf_counter()
    name = device_name(device)
    print(f"{name}, torch {torch.__version__}")

    counts = [8, 32, 100, 200, 400, 800]
    print("\n1. unmerged switch time vs adapted layers (16 x 16 layers, 4 rank-4 adapters)")
    switch_rows = switch_vs_layers(counts, 5 * args.rounds, device)
    served = [r["served"]["median_s"] for r in switch_rows]
    flat = max(served) / min(served)
    worst = max(served)
    print(
        f"  served: {us(min(served))} to {us(worst)} ({flat:.2f}x from 8 to 800 layers); target "
        f"< 50 us whatever the count: {'met' if worst < 50e-6 else 'NOT met'}"
    )

    print("\n2. decode step, 8 adapters in slots, small Llama")
    mixed = llama_steps(args, device, 8, [8])
    print(f"\n3. {args.adapters} adapters in slots, random mixed batches")
    many = llama_steps(args, device, args.adapters, [16, 64])

    captured = None
    if device.type == "cuda":
        print("\n4. captured decode steps (CUDA graphs)")
        try:
            captured = captured_steps(args, device)
        except RuntimeError as exc:  # e.g. a transformers op that cannot be captured
            captured = {"error": f"{type(exc).__name__}: {exc}"}
            print(f"  not measured: {captured['error']}")

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = args.out or RESULTS / f"bench_serving_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "lora_kernels": lk.__version__,
        "threads": torch.get_num_threads(),
        "command": "python benchmarks/bench_serving.py " + " ".join(sys.argv[1:] or argv or []),
        "switch_vs_layers": switch_rows,
        "switch_target_met": worst < 50e-6,
        "decode_step": mixed,
        "many_adapters": many,
        "captured_decode_step": captured,
        "wall_s": time.perf_counter() - started,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = write_results(out, "bench_serving", timing_rows(result), device=device, details=result)
    print(f"\nwrote {paths[0]} and {paths[1]}")
    png = out.with_suffix(".png")
    if plot(switch_rows, png, "unmerged switch vs adapted layers", device):
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
