"""One LoRA training step of a small Llama: our model conversion vs PEFT, same config.

Providers, each with its own copy of the same base model and adapter weights:

* ``PEFT``            ``peft.get_peft_model``: PEFT's own LoRA layers
* ``PEFT + fuse``     the same PEFT model after ``lora_kernels.integrations.peft.fuse``
* ``get_lora_model``  ``lora_kernels.get_lora_model``: ``FusedLoraLinear`` layers

A step is forward with labels, backward, ``AdamW.step`` and ``zero_grad``. Reported: the median
step time (20th/80th percentiles, providers timed round-robin so machine drift hits them alike),
the bytes autograd keeps for backward (activations, counted once per storage, parameters
excluded: what a training step holds at its peak besides the weights), and on CUDA the peak
allocated memory of a step. The first step's losses must agree before anything is timed.

    python benchmarks/bench_train_step.py                       # CPU, tiny Llama, ~1 minute
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --hidden 1024 --layers 8 \\
        --out benchmarks/results/train_step_h200.json

Writes a table to stdout and, with ``--out``, the rows as JSON with the device and versions.
"""

from __future__ import annotations

import argparse
import copy
import sys

import torch

from lora_kernels.bench import device_name, time_side_by_side, timing_rows, write_results
from lora_kernels.models.model import LoraConfig, get_lora_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_models(args, device, dtype):
    import peft
    import transformers

    from lora_kernels.integrations.peft import fuse

    transformers.logging.set_verbosity_error()
    config = transformers.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 128),
        max_position_embeddings=args.seq,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).to(device=device, dtype=dtype)
    lora = {
        "r": args.rank,
        "lora_alpha": 2 * args.rank,
        "target_modules": "all-linear",
        "lora_dropout": args.dropout,
    }
    reference = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**lora))
    with torch.no_grad():  # a trained-looking adapter, so B is not zero
        for name, p in reference.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.02)
    fused = fuse(copy.deepcopy(reference))
    ours = get_lora_model(copy.deepcopy(base), LoraConfig(**lora))
    with torch.no_grad():
        peft_params = dict(reference.named_parameters())
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(peft_params["base_model.model." + name])
    return {"PEFT": reference, "PEFT + fuse": fused, "get_lora_model": ours}


def saved_activation_bytes(model, ids) -> int:
    """Bytes autograd saves for backward in one forward, per storage, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    return sum(storages.values())


def make_step(model, ids, lr):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return step


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--dropout", type=float, default=0.0)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"

    models = build_models(args, device, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=gen).to(device)

    with torch.no_grad():  # eval mode: no dropout, so the three must agree
        losses = {name: m.eval()(ids, labels=ids).loss.item() for name, m in models.items()}
    ref = losses["PEFT"]
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    bad = {n: v for n, v in losses.items() if abs(v - ref) > tol * max(1.0, abs(ref))}
    if bad:
        raise SystemExit(f"losses disagree before timing: {losses}")

    for m in models.values():
        m.train()
    saved = {name: saved_activation_bytes(m, ids) for name, m in models.items()}
    steps = {name: make_step(m, ids, 1e-4) for name, m in models.items()}
    timings = time_side_by_side(steps, cuda=cuda, warmup=2, rounds=args.rounds)
    peaks = {}
    if cuda:
        for name, step in steps.items():
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
            step()
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated(device)

    trainable = {
        name: sum(p.numel() for p in m.parameters() if p.requires_grad)
        for name, m in models.items()
    }
    rows = []
    base = timings["PEFT"]["median_s"]
    for name, t in timings.items():
        rows.append(
            {
                "provider": name,
                "median_ms": 1e3 * t["median_s"],
                "p20_ms": 1e3 * t["p20_s"],
                "p80_ms": 1e3 * t["p80_s"],
                "speedup_vs_peft": base / t["median_s"],
                "saved_activation_mib": saved[name] / 2**20,
                "peak_cuda_mib": peaks[name] / 2**20 if cuda else None,
                "trainable_params": trainable[name],
                "first_loss": losses[name],
            }
        )

    shape = (
        f"Llama hidden {args.hidden}, {args.layers} layers, batch {args.batch} x seq {args.seq}, "
        f"LoRA r={args.rank} on all linear layers, {args.dtype}, dropout {args.dropout}"
    )
    print(f"{shape}\non {device_name(device)}")
    header = (
        f"{'provider':16s} {'step ms':>9s} {'p20-p80 ms':>15s} {'vs PEFT':>8s} {'saved MiB':>10s}"
    )
    if cuda:
        header += f" {'peak MiB':>9s}"
    print(header)
    for r in rows:
        line = (
            f"{r['provider']:16s} {r['median_ms']:9.1f} "
            f"{r['p20_ms']:7.1f}-{r['p80_ms']:<7.1f} {r['speedup_vs_peft']:7.2f}x "
            f"{r['saved_activation_mib']:10.1f}"
        )
        if cuda:
            line += f" {r['peak_cuda_mib']:9.1f}"
        print(line)

    if args.out:
        details = {"setup": shape, "args": vars(args)}
        paths = write_results(
            args.out,
            "train_step",
            [{**r, "case": shape} for r in timing_rows(rows)],
            device=device,
            details=details,
        )
        print(f"wrote {paths[0]} and {paths[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
