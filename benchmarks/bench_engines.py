"""Serving engines with and without lora_kernels (GPU only; docs/serving-engines.md).

vLLM: offline generation throughput (output tokens per second) on a small model with
``--adapters`` LoRA adapters of rank ``--rank``, requests spread over them round-robin, three
ways in separate processes: no LoRA, vLLM's own punica kernels (``LORA_KERNELS_VLLM=0``), ours.
Targets: ours >= 95% of no-LoRA and >= 1.3x stock.

SGLang: per-token decode latency (wall time / output tokens of a batch of requests) with
``--lora-backend csgmv`` (SGLang's default) and ``--lora-backend lora_kernels``.
Target: ours >= 1.2x faster.

The model is a small Llama-shaped one with random weights and random adapters, written to a
temporary folder (transformers + peft; nothing is downloaded: the lent GPU machine has no
network). Results go to
``--out`` as JSON with the GPU's name and the versions.

    python benchmarks/bench_engines.py --engine vllm --out results/engines.json

On a machine without CUDA, or without the engine, it says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REFUSED = 2


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=["vllm", "sglang", "both"], default="both")
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--prompts", type=int, default=256, help="requests per run")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request")
    p.add_argument("--repeats", type=int, default=3, help="runs per way; the median is kept")
    p.add_argument("--out", type=Path, help="JSON results file")
    p.add_argument("--worker", help=argparse.SUPPRESS)  # internal: one measured run
    return p.parse_args(argv)


def why_not(engine: str) -> str | None:
    """Why this machine cannot run the benchmark for ``engine`` (None: it can)."""
    import torch

    if not torch.cuda.is_available():
        return "needs a CUDA GPU (torch.cuda.is_available() is False)"
    if importlib.util.find_spec(engine) is None:
        return f"needs {engine} installed (pip install 'lora_kernels[{engine}]')"
    return None


def make_model(folder: Path, adapters: int, rank: int) -> tuple[Path, list[Path]]:
    """A ~100M-parameter Llama with random weights and ``adapters`` random PEFT adapters on
    q, k, v, o, gate, up and down."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    cfg = LlamaConfig(
        vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=2048,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    base = folder / "base"
    model.save_pretrained(base)
    _write_tokenizer(base, cfg.vocab_size, PreTrainedTokenizerFast)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    paths = []
    for i in range(adapters):
        torch.manual_seed(100 + i)
        peft_cfg = LoraConfig(
            r=rank, lora_alpha=2 * rank, target_modules=targets, init_lora_weights=False
        )
        peft_model = get_peft_model(LlamaForCausalLM(cfg).to(torch.bfloat16), peft_cfg)
        path = folder / f"adapter{i}"
        peft_model.save_pretrained(path)
        paths.append(path)
    return base, paths


def _write_tokenizer(folder: Path, vocab_size: int, fast_cls) -> None:
    """A word-level tokenizer over synthetic words: the engines need one, its quality is moot."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = fast_cls(tokenizer_object=tok, unk_token="w0", bos_token="w1", eos_token="w2")
    fast.save_pretrained(folder)


def _prompts(n: int) -> list[str]:
    return [" ".join(f"w{(7 * i + j) % 30000 + 3}" for j in range(64)) for i in range(n)]


def run_vllm_worker(mode: str, args, base: str, adapters: list[str]) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    llm = LLM(
        model=base, enable_lora=mode != "no_lora", max_loras=len(adapters),
        max_lora_rank=args.rank, dtype="bfloat16", gpu_memory_utilization=0.5,
    )  # fmt: skip
    params = SamplingParams(max_tokens=args.max_tokens, ignore_eos=True, temperature=0.0)
    prompts = _prompts(args.prompts)
    requests = None
    if mode != "no_lora":
        lora = [LoRARequest(f"a{i}", i + 1, p) for i, p in enumerate(adapters)]
        requests = [lora[i % len(lora)] for i in range(len(prompts))]
    llm.generate(prompts[:8], params, lora_request=requests[:8] if requests else None)  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, lora_request=requests)
        times.append(time.perf_counter() - t0)
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    median = sorted(times)[len(times) // 2]
    return {"mode": mode, "tokens_per_s": tokens / median, "seconds": times}


def run_sglang_worker(mode: str, args, base: str, adapters: list[str]) -> dict:
    import sglang as sgl

    paths = {f"a{i}": p for i, p in enumerate(adapters)}
    engine = sgl.Engine(
        model_path=base, lora_paths=paths, lora_backend=mode, max_loras_per_batch=len(paths),
        max_lora_rank=args.rank, mem_fraction_static=0.5,
    )  # fmt: skip
    prompts = _prompts(args.prompts)
    names = [f"a{i % len(paths)}" for i in range(len(prompts))]
    params = {"max_new_tokens": args.max_tokens, "ignore_eos": True, "temperature": 0.0}
    engine.generate(prompts[:8], params, lora_path=names[:8])  # warm-up
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        engine.generate(prompts, params, lora_path=names)
        times.append(time.perf_counter() - t0)
    engine.shutdown()
    median = sorted(times)[len(times) // 2]
    return {"mode": mode, "ms_per_token": 1e3 * median / args.max_tokens, "seconds": times}


def _spawn(engine: str, mode: str, argv: list[str], base: Path, adapters: list[Path]) -> dict:
    env = dict(os.environ)
    env["LORA_KERNELS_VLLM"] = "0" if mode == "stock" else "1"
    payload = json.dumps({"base": str(base), "adapters": [str(p) for p in adapters]})
    cmd = [sys.executable, __file__, *argv, "--worker", f"{engine}:{mode}:{payload}"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        engine, mode, payload = args.worker.split(":", 2)
        spec = json.loads(payload)
        run = run_vllm_worker if engine == "vllm" else run_sglang_worker
        print(json.dumps(run(mode, args, spec["base"], spec["adapters"])))
        return 0
    engines = ["vllm", "sglang"] if args.engine == "both" else [args.engine]
    reasons = {e: why_not(e) for e in engines}
    runnable = [e for e in engines if reasons[e] is None]
    for e in engines:
        if reasons[e]:
            print(f"bench_engines: {e}: {reasons[e]}", file=sys.stderr)
    if not runnable:
        return REFUSED
    import torch

    results = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        base, adapters = make_model(Path(tmp), args.adapters, args.rank)
        for engine in runnable:
            modes = ["no_lora", "stock", "ours"] if engine == "vllm" else ["csgmv", "lora_kernels"]
            runs = {m: _spawn(engine, m, argv, base, adapters) for m in modes}
            results["runs"][engine] = runs
            if engine == "vllm":
                ours, stock, none = (runs[m]["tokens_per_s"] for m in ("ours", "stock", "no_lora"))
                print(f"vLLM tokens/s: no LoRA {none:.0f}, stock {stock:.0f}, ours {ours:.0f} "
                      f"({ours / none:.1%} of no-LoRA, {ours / stock:.2f}x stock)")  # fmt: skip
            else:
                ours, theirs = (runs[m]["ms_per_token"] for m in ("lora_kernels", "csgmv"))
                print(f"SGLang ms/token: csgmv {theirs:.3f}, ours {ours:.3f} "
                      f"({theirs / ours:.2f}x)")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
