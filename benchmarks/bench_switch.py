"""Switching a whole model between LoRA adapters, by every route, against the copy bandwidth.

The model is a transformers ``LlamaForCausalLM`` built from a config (default: hidden 1024,
8 layers, bf16, ~320 MB), LoRA on every projection of every layer. Three adapters of ranks 8, 16
and 64, whose deltas are ~2% of the weights elementwise (what trained adapters look like), are
written by PEFT's ``save_pretrained``; a fine-tuned model (the base with one of them merged) by
transformers' ``save_pretrained``. Timed, each as the median switch from one adapter to another:

* reload the fine-tuned model from disk: ``from_pretrained``, and ``load_state_dict`` of its
  safetensors file into the model already in memory; cold (the file's pages dropped from the page
  cache first, with ``posix_fadvise``, which touches no other file) and warm;
* load the adapter from disk (read its PEFT directory) and merge it;
* from the RAM cache (``AdapterCache``): merged (arithmetic), merged exact, unmerged, and
  unmerged from device slots;
* the floor: copying the adapted layers' weights once (``copy_``, read + write), which is the
  traffic of one merge; a switch between two merged adapters is an unmerge plus a merge.

Also: how far 1000 switches (merge + unmerge pairs) move one layer's bf16 weight in each mode
(PEFT's naive add/subtract, our single-rounding arithmetic, exact), and the size of the exact
mode's records. On CUDA: pinned host-to-device bandwidth, and the merge's HBM bandwidth.

    python benchmarks/bench_switch.py [--layers 8] [--hidden 1024] [--switches 1000]
        [--threads 1] [--out PATH] [--plot PATH] [--quick]
    python benchmarks/bench_switch.py --serving [bench_serving.py's options]

``--serving`` runs ``benchmarks/bench_serving.py`` instead: unmerged switches of a model served
from device slots against the number of adapted layers, mixed-adapter decode steps, and 1000
adapters on a small Llama.

Prints a table, writes JSON (``--out``, default ``benchmarks/results/``) and a PNG bar chart
(``--plot``, needs matplotlib). The issue's CPU target: switching from the RAM cache >= 100x faster
than reloading the fine-tuned model from disk.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import lora_kernels as lk
from lora_kernels.bench import time_call, time_calls, timing_rows, write_results
from lora_kernels.serving.cache import AdapterCache
from lora_kernels.serving.exact_merge import exact_merge_, exact_unmerge_
from lora_kernels.serving.switch import release_adapters, switch_adapter

RESULTS = Path(__file__).resolve().parent / "results"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {"x": 8, "y": 16, "z": 64}  # name -> rank
RHO = 0.02  # each adapter's delta, elementwise, relative to the weight
DTYPE = torch.bfloat16


# ---------------------------------------------------------------------------------------------
# setup
# ---------------------------------------------------------------------------------------------


def build_model(layers: int, hidden: int, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=int(hidden * 2.75) // 64 * 64,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 128),
        vocab_size=32000,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(DTYPE)
    with torch.no_grad():
        for _name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    return model.to(device).eval()


def targeted(model: nn.Module) -> dict[str, nn.Linear]:
    return {
        path: m
        for path, m in model.named_modules()
        if isinstance(m, nn.Linear) and path.rsplit(".", 1)[-1] in TARGETS
    }


def write_adapters(model: nn.Module, root: Path) -> dict[str, Path]:
    """PEFT's save_pretrained for each adapter, B scaled so that the delta is RHO of W."""
    import peft

    paths = {}
    peft_model = None
    for name, r in ADAPTERS.items():
        config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS)
        if peft_model is None:
            peft_model = peft.get_peft_model(model, config, adapter_name=name)
        else:
            peft_model.add_adapter(name, config)
        with torch.no_grad():
            for m in peft_model.modules():
                if isinstance(m, peft.tuners.lora.LoraLayer) and name in m.lora_A:
                    # PEFT's A is kaiming-uniform, entries of std 1/sqrt(3 K), so the entries of
                    # scale * B @ A (scale = 2) have std 2 sqrt(r) std(B) / sqrt(3 K): choose
                    # std(B) for a delta of RHO times the weights' std of 0.02.
                    k = m.lora_A[name].weight.shape[1]
                    m.lora_B[name].weight.normal_(0, RHO * 0.02 * (3 * k / r) ** 0.5 / 2)
        peft_model.save_pretrained(root, selected_adapters=[name])
        paths[name] = root / name
    peft_model.unload()
    return paths


def write_finetuned(model: nn.Module, adapter_dir: Path, root: Path) -> Path:
    """The base with one adapter merged, as transformers saves a fine-tuned model."""
    from lora_kernels.models.checkpoint import read_peft_adapter, split_peft_key

    config, tensors = read_peft_adapter(adapter_dir)
    scale = config["lora_alpha"] / config["r"]
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        path, part = split_peft_key(key)
        parts.setdefault(path, {})[part] = t
    state = {k: v.clone() for k, v in model.state_dict().items()}
    for path, ab in parts.items():
        w = state[f"{path}.weight"]
        lk.merge_lora_(w, ab["lora_A"].to(w.device), ab["lora_B"].to(w.device), scale)
    out = root / "finetuned"
    model.save_pretrained(out, state_dict=state)
    return out


def to_fused(model: nn.Module) -> None:
    """Every targeted nn.Linear becomes a FusedLoraLinear sharing its weight (no adapter)."""
    for path, lin in targeted(model).items():
        parent, _, child = path.rpartition(".")
        setattr(model.get_submodule(parent), child, lk.FusedLoraLinear.from_linear(lin, r=0))


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------


def timed(fn, device: torch.device, rounds: int, warmup: int = 1) -> dict:
    """Median, p20, p80 seconds of ``fn(i)`` over ``rounds`` synchronised calls."""
    return time_calls(fn, rounds, warmup=warmup, device=device)


def drop_from_page_cache(directory: Path) -> None:
    """Evict the directory's files from the page cache (only those files' pages)."""
    for f in directory.iterdir():
        fd = os.open(f, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def bench_reload(model, ft_dir: Path, device, rounds: int) -> list[dict]:
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    files = sorted(ft_dir.glob("*.safetensors"))
    rows = []
    for cold in (True, False):
        tag = "cold" if cold else "warm"

        def from_pretrained(_i, cold=cold):
            if cold:
                drop_from_page_cache(ft_dir)
            LlamaForCausalLM.from_pretrained(ft_dir, dtype=DTYPE).to(device)

        def load_state(_i, cold=cold):
            if cold:
                drop_from_page_cache(ft_dir)
            for f in files:
                model.load_state_dict(load_file(f, device=str(device)), strict=False)

        rows.append(
            {"path": f"reload fine-tuned: from_pretrained ({tag})"}
            | timed(from_pretrained, device, rounds)
        )
        rows.append(
            {"path": f"reload fine-tuned: load_state_dict ({tag})"}
            | timed(load_state, device, rounds)
        )
    return rows


def cycle(i: int) -> str:
    names = list(ADAPTERS)
    return names[i % len(names)]


def bench_switches(model, adapter_dirs, device, rounds: int) -> list[dict]:
    rows = []
    # From disk: the cache starts empty each time, so every switch reads the directory.
    disk = AdapterCache(1 << 34, dtype=DTYPE)
    for name, path in adapter_dirs.items():
        disk.load(name, path, lazy=True)

    def from_disk(i):
        name = cycle(i)
        if name in disk:
            disk.evict(name)
        switch_adapter(model, name, cache=disk, merged=True)

    rows.append({"path": "adapter from disk, merged"} | timed(from_disk, device, rounds))
    switch_adapter(model, None)

    cache = AdapterCache(1 << 34, dtype=DTYPE)
    for name, path in adapter_dirs.items():
        cache.load(name, path)
    for label, kw in (
        ("RAM cache, merged", {"merged": True}),
        ("RAM cache, merged exact", {"merged": True, "exact": True}),
        ("RAM cache, unmerged", {}),
    ):
        rows.append(
            {"path": label}
            | timed(lambda i, kw=kw: switch_adapter(model, cycle(i), cache=cache, **kw), device,
                    rounds if "merged" in kw else 4 * rounds, warmup=len(ADAPTERS))
        )  # fmt: skip
        switch_adapter(model, None)
    cache.attach(model, num_slots=len(ADAPTERS), max_rank=max(ADAPTERS.values()))
    for name in ADAPTERS:
        cache.prefetch(name)
    rows.append(
        {"path": "device slots, unmerged"}
        | timed(lambda i: switch_adapter(model, cycle(i), cache=cache), device, 4 * rounds,
                warmup=len(ADAPTERS))
    )  # fmt: skip
    rows.append(
        {"path": "device slots, merged"}
        | timed(lambda i: switch_adapter(model, cycle(i), cache=cache, merged=True), device,
                rounds)
    )  # fmt: skip
    switch_adapter(model, None)
    return rows


def bench_copy(model, device, rounds: int) -> tuple[dict, int]:
    """One pass of copy_ over the adapted layers' weights (what one merge reads and writes)."""
    weights = [m.weight for m in model.modules() if isinstance(m, lk.FusedLoraLinear)]
    nbytes = sum(w.numel() * w.element_size() for w in weights)
    scratch = [torch.empty_like(w) for w in weights]

    def copy(_i):
        for dst, src in zip(scratch, weights, strict=True):
            dst.copy_(src)

    row = {"path": "copy adapted weights once (floor of a merge)"} | timed(copy, device, rounds)
    row["GB/s"] = 2 * nbytes / row["median_s"] / 1e9
    return row, nbytes


def record_sizes(model, cache_dirs) -> dict:
    """Exact-merge records of each adapter over the whole model: fraction and bytes."""
    cache = AdapterCache(1 << 34, dtype=DTYPE)
    out = {}
    layers = [m for m in model.modules() if isinstance(m, lk.FusedLoraLinear)]
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers)
    for name, path in cache_dirs.items():
        cache.load(name, path)
        switch_adapter(model, name, cache=cache, merged=True, exact=True)
        records = [m._exact_records[name] for m in layers if name in m._exact_records]
        recorded = sum(r.num_recorded for r in records)
        nbytes = sum(r.nbytes for r in records)
        numel = sum(r.shape[0] * r.shape[1] for r in records)
        out[name] = {
            "rank": ADAPTERS[name],
            "fraction_recorded": recorded / numel,
            "record_bytes": nbytes,
            "record_vs_weight_copy": nbytes / weight_bytes,
        }
    switch_adapter(model, None)
    release_adapters(model)
    return out


def drift(model, adapter_dirs, switches: int) -> dict:
    """``switches`` merge+unmerge pairs among the adapters on one k_proj weight, per mode."""
    cache = AdapterCache(1 << 34, dtype=DTYPE)
    path = next(p for p in targeted_paths(model) if p.endswith("k_proj"))
    adapters = []
    for name, d in adapter_dirs.items():
        cache.load(name, d)
        lay = cache.get(name).layers[path]
        adapters.append((lay.lora_a, lay.lora_b, lay.scaling))
    w0 = model.get_submodule(path).weight.detach().cpu().clone()
    checkpoints = sorted({1, 10, 100, switches})
    out = {"layer": path, "shape": list(w0.shape), "switches": switches}
    for mode in ("naive (PEFT)", "arithmetic", "exact"):
        w = w0.clone()
        rows = []
        for i in range(1, switches + 1):
            a, b, scale = adapters[i % len(adapters)]
            if mode == "naive (PEFT)":
                delta = (b @ a) * scale  # rounded to bf16, then added and subtracted in bf16
                w += delta
                w -= delta
            elif mode == "arithmetic":
                lk.merge_lora_(w, a, b, scale)
                lk.unmerge_lora_(w, a, b, scale)
            else:
                exact_unmerge_(w, a, b, scale, exact_merge_(w, a, b, scale))
            if i in checkpoints:
                diff = (w.double() - w0.double()).pow(2).mean().sqrt()
                rows.append(
                    {
                        "switches": i,
                        "rms_drift_rel": (diff / w0.double().pow(2).mean().sqrt()).item(),
                        "max_abs_drift": (w.double() - w0.double()).abs().max().item(),
                        "fraction_changed": (w.view(torch.int16) != w0.view(torch.int16))
                        .double()
                        .mean()
                        .item(),
                    }
                )
        out[mode] = rows
    return out


def targeted_paths(model) -> list[str]:
    return [p for p, m in model.named_modules() if isinstance(m, lk.FusedLoraLinear)]


def cuda_extras(device, quick: bool) -> dict:
    """Pinned host-to-device bandwidth, and the merge's bandwidth over W (read + write)."""
    nbytes = 1 << 30
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.empty(nbytes, dtype=torch.uint8, device=device)
    rep = 200 if quick else 500

    def ms(fn) -> float:
        return time_call(fn, cuda=True, rep_ms=rep)["median_s"] * 1e3

    h2d = ms(lambda: dev.copy_(host, non_blocking=True))
    w = torch.randn(8192, 8192, device=device).to(DTYPE)
    a = torch.randn(16, 8192, device=device).to(DTYPE) * 1e-3
    b = torch.randn(8192, 16, device=device).to(DTYPE) * 1e-3
    merge = ms(lambda: lk.merge_lora_(w, a, b, 1e-3))
    wbytes = w.numel() * w.element_size()
    return {
        "h2d_pinned_GBps": nbytes / (h2d * 1e-3) / 1e9,
        "merge_8192x8192_r16_ms": merge,
        "merge_GBps": 2 * wbytes / (merge * 1e-3) / 1e9,
    }


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({torch.get_num_threads()} threads)"


def table(rows: list[dict], reload_s: float) -> str:
    lines = [f"{'switch route':<48} {'median':>10} {'p20':>10} {'p80':>10} {'vs reload':>10}"]
    for row in rows:
        lines.append(
            f"{row['path']:<48} {_fmt_s(row['median_s']):>10} {_fmt_s(row['p20_s']):>10} "
            f"{_fmt_s(row['p80_s']):>10} {reload_s / row['median_s']:>9.1f}x"
        )
    return "\n".join(lines)


def _fmt_s(s: float) -> str:
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3:
        return f"{s * 1e3:.1f} ms"
    return f"{s * 1e6:.0f} us"


def plot(rows: list[dict], path: Path, title: str, device) -> bool:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import _plot

    if not _plot.available():
        return False
    fig, (ax,) = _plot.figure(1, width=9, height=0.45 * len(rows) + 1.4)
    _plot.bars(
        ax,
        [r["path"] for r in rows],
        [r["median_s"] for r in rows],
        xlabel="seconds per switch (median, log scale; bars: p20-p80)",
        spread=[(r["p20_s"], r["p80_s"]) for r in rows],
        log=True,
    )
    _plot.save(fig, path, title, device=device)
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--serving" in argv:  # switching a model served from device slots: its own script
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import bench_serving

        return bench_serving.main([a for a in argv if a != "--serving"])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--switches", type=int, default=1000, help="for the drift table")
    parser.add_argument("--rounds", type=int, default=None, help="timed switches per route")
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1, so that a shared machine's load does not swamp the "
        "timings; 0: torch's default)",
    )
    parser.add_argument("--out", type=Path, help="JSON path (default: benchmarks/results/)")
    parser.add_argument("--plot", type=Path, help="PNG path (default: beside the JSON)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 6)
    started = time.perf_counter()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = build_model(args.layers, args.hidden, device)
        model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        adapter_dirs = write_adapters(model, root)
        ft_dir = write_finetuned(model, adapter_dirs["x"], root)
        to_fused(model)
        rows = bench_reload(model, ft_dir, device, rounds)
        with torch.no_grad():
            copy_row, adapted_bytes = bench_copy(model, device, 4 * rounds)
            # Records and drift first, on the pristine base: arithmetic switches move the
            # weights towards a cycle of the merge/unmerge rounding, where fewer elements need
            # recording.
            records = record_sizes(model, adapter_dirs)
            drift_table = drift(model, adapter_dirs, args.switches)
            rows += bench_switches(model, adapter_dirs, device, rounds)
    rows.append(copy_row)
    extras = cuda_extras(device, args.quick) if device.type == "cuda" else {}

    cold = min(
        r["median_s"] for r in rows if r["path"].startswith("reload") and "cold" in r["path"]
    )
    ram = {r["path"]: r["median_s"] for r in rows if r["path"].startswith(("RAM", "device"))}
    best_ram = min(ram.values())
    name = device_name(device)
    title = (
        f"Llama {args.layers}x{args.hidden}, {model_bytes / 1e6:.0f} MB bf16, LoRA on "
        f"{adapted_bytes / 1e6:.0f} MB of projections; {name}"
    )
    print(title)
    print(table(rows, cold))
    print(
        f"\ntarget: RAM-cache switch >= 100x faster than the fastest cold reload "
        f"({_fmt_s(cold)}): best RAM route {_fmt_s(best_ram)} = {cold / best_ram:.0f}x "
        f"({'met' if cold / best_ram >= 100 else 'NOT met'}); per route: "
        + ", ".join(f"{k} {cold / v:.1f}x" for k, v in ram.items())
    )
    print("\nexact-mode records (whole model):")
    for adapter, rec in records.items():
        print(
            f"  {adapter} (r={rec['rank']}): {100 * rec['fraction_recorded']:.2f}% of elements, "
            f"{rec['record_bytes'] / 1e6:.1f} MB = {100 * rec['record_vs_weight_copy']:.1f}% of "
            "a copy of the adapted weights"
        )
    print(f"\ndrift of {drift_table['layer']} {drift_table['shape']} after N switches:")
    print(f"  {'mode':<14} {'N':>6} {'rms drift / rms W':>18} {'max |dW|':>10} {'changed':>9}")
    for mode in ("naive (PEFT)", "arithmetic", "exact"):
        for r in drift_table[mode]:
            print(
                f"  {mode:<14} {r['switches']:>6} {r['rms_drift_rel']:>18.2e} "
                f"{r['max_abs_drift']:>10.2e} {100 * r['fraction_changed']:>8.2f}%"
            )
    for key, value in extras.items():
        print(f"{key}: {value:.1f}")

    slug = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = args.out or RESULTS / f"bench_switch_{slug}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "lora_kernels": lk.__version__,
        "model": {
            "layers": args.layers,
            "hidden": args.hidden,
            "bytes": model_bytes,
            "adapted_weight_bytes": adapted_bytes,
            "adapters": ADAPTERS,
            "delta_vs_weight": RHO,
        },
        "rows": rows,
        "cold_reload_s": cold,
        "best_ram_switch_s": best_ram,
        "speedup_vs_cold_reload": {k: cold / v for k, v in ram.items()},
        "records": records,
        "drift": drift_table,
        "cuda": extras,
        "wall_s": time.perf_counter() - started,
    }
    device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = write_results(out, "bench_switch", timing_rows(rows), device=device, details=result)
    print(f"wrote {paths[0]} and {paths[1]}")
    png = args.plot or out.with_suffix(".png")
    if plot(rows, png, title, device):
        print(f"wrote {png}")
    print(f"total {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
