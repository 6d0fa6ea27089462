"""Our models in the PyTorch / Hugging Face ecosystem: transformers.Trainer, gradient
checkpointing, DistributedDataParallel (gloo, 2 CPU processes) and FSDP2's fully_shard."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lora_kernels.models.model import LoraConfig, get_lora_model
from tests.helpers import peft_model_of, randomise, tiny_llama

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from lora_kernels.integrations.peft import fuse  # noqa: E402

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def lora_grads(model) -> dict[str, torch.Tensor]:
    return {
        n.removeprefix("module."): p.grad.detach().clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def batch(seed: int = 1, rows: int = 4, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 61, (rows, length), generator=g)


def our_model():
    model = get_lora_model(tiny_llama(), LoraConfig(**CONFIG))
    randomise(model)
    return model


# ------------------------------------------------------------------------------------------
# Trainer
# ------------------------------------------------------------------------------------------


class RepeatedBatch(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


@pytest.mark.parametrize("kind", ["get_lora_model", "peft_fused"])
def test_trainer_trains_only_the_adapter(tmp_path, kind):
    if kind == "get_lora_model":
        model = get_lora_model(tiny_llama(), LoraConfig(**CONFIG))
    else:
        model = fuse(peft_model_of(tiny_llama(), **CONFIG))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids = batch(rows=8)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=6,
        per_device_train_batch_size=8,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=RepeatedBatch(ids))
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses
    now = dict(model.named_parameters())
    assert all(torch.equal(now[n], v) for n, v in frozen.items())
    assert all(not torch.equal(now[n], v) for n, v in trained.items() if ".lora_B." in n)


# ------------------------------------------------------------------------------------------
# gradient checkpointing
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_gradients(reentrant):
    ids = batch()
    plain = our_model().train()
    plain(ids, labels=ids).loss.backward()
    checkpointed = copy.deepcopy(plain)
    checkpointed.zero_grad()
    kwargs = {"use_reentrant": reentrant}
    if hasattr(checkpointed, "activation_checkpointing_enable"):  # transformers >= 5
        checkpointed.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        assert checkpointed.is_activation_checkpointing
    else:
        checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        assert checkpointed.is_gradient_checkpointing
    if reentrant:
        # Reentrant checkpointing only backpropagates into blocks whose input needs a grad, and
        # the embedding is frozen: transformers >= 5 asks for input grads itself, older
        # versions need this call (as PEFT makes it).
        checkpointed.enable_input_require_grads()
    calls = []
    q0 = checkpointed.model.layers[0].self_attn.q_proj
    q0.register_forward_hook(lambda *_: calls.append(1))
    checkpointed(ids, labels=ids).loss.backward()
    assert len(calls) == 2  # the block ran again in backward: checkpointing is on
    got, ref = lora_grads(checkpointed), lora_grads(plain)
    assert set(got) == set(ref) and len(got) == 12
    for name, g in got.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=name)


# ------------------------------------------------------------------------------------------
# DistributedDataParallel and FSDP2 on CPU (gloo)
# ------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        ids = batch(rows=4).chunk(world)[rank]
        ddp = torch.nn.parallel.DistributedDataParallel(our_model().train())
        ddp(ids, labels=ids).loss.backward()
        result = {"ddp": lora_grads(ddp)}
        try:
            from torch.distributed.fsdp import fully_shard

            model = our_model().train()
            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
            model(ids, labels=ids).loss.backward()
            result["fsdp"] = {
                n: p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad
            }
        except Exception as e:  # FSDP2 on CPU depends on the torch build: report, don't hide
            result["fsdp_error"] = f"{type(e).__name__}: {e}"
        if rank == 0:
            torch.save(result, os.path.join(out_dir, "grads.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_and_fsdp2_give_single_process_gradients(tmp_path):
    ids = batch(rows=4)
    single = our_model().train()
    single(ids, labels=ids).loss.backward()
    ref = lora_grads(single)
    mp.spawn(_distributed_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    result = torch.load(tmp_path / "grads.pt")
    # Each rank's loss is the mean over its half of the tokens (equal halves), and DDP averages
    # the ranks' gradients: the whole-batch mean's gradient.
    assert set(result["ddp"]) == set(ref) and len(ref) == 12
    for name, g in result["ddp"].items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=f"ddp {name}")
    assert "fsdp_error" not in result, result.get("fsdp_error")
    assert set(result["fsdp"]) == set(ref)
    for name, g in result["fsdp"].items():
        torch.testing.assert_close(g, ref[name], rtol=1e-4, atol=1e-6, msg=f"fsdp {name}")
