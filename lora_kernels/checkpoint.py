"""Adapters on disk in PEFT's layout.

A PEFT LoRA adapter is a directory holding ``adapter_config.json`` (the ``LoraConfig`` fields,
``peft_type: "LORA"``) and ``adapter_model.safetensors`` (or the older ``adapter_model.bin``)
whose keys are ``base_model.model.<module path>.lora_A.weight`` (``[r, in]``) and
``.lora_B.weight`` (``[out, r]``), without the adapter's name: the name is chosen when loading.
"""

from __future__ import annotations

import json
import os
import re

import torch

__all__ = ["read_peft_adapter", "split_peft_key"]

CONFIG_NAME = "adapter_config.json"
SAFETENSORS_NAME = "adapter_model.safetensors"
BIN_NAME = "adapter_model.bin"
KEY_PREFIX = "base_model.model."

# "<module path>.lora_A.weight", or "<module path>.lora_A.<adapter name>.weight" as PEFT's
# in-memory state_dict spells it (adapter names hold no ".", PEFT and FusedLoraLinear agree).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B)(?:\.[^.]+)?\.weight$")


def read_peft_adapter(path: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor]]:
    """Read a PEFT adapter directory: ``(config dict, {file key: tensor})`` on the CPU.

    ``path`` holds ``adapter_config.json`` and ``adapter_model.safetensors``, or
    ``adapter_model.bin`` when there is no safetensors file. The keys are returned as stored.
    """
    fn = "read_peft_adapter"
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{fn}: expected path to be an adapter directory, got {path!r}")
    config_file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(config_file):
        raise FileNotFoundError(f"{fn}: {path!r} has no {CONFIG_NAME}")
    with open(config_file, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{fn}: {config_file!r} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise ValueError(
            f"{fn}: expected {config_file!r} to hold a JSON object, got {type(config).__name__}"
        )
    st_file = os.path.join(path, SAFETENSORS_NAME)
    bin_file = os.path.join(path, BIN_NAME)
    if os.path.isfile(st_file):
        from safetensors.torch import load_file

        tensors = load_file(st_file, device="cpu")
    elif os.path.isfile(bin_file):
        tensors = torch.load(bin_file, map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{fn}: {path!r} has neither {SAFETENSORS_NAME} nor {BIN_NAME}")
    return config, dict(tensors)


def split_peft_key(key: str) -> tuple[str, str]:
    """``"base_model.model.a.b.lora_A.weight"`` -> ``("a.b", "lora_A")``.

    Also accepts the key without the ``base_model.model.`` prefix and with an adapter name before
    ``weight`` (``"a.b.lora_B.default.weight"``). Anything else raises ``ValueError``.
    """
    m = _LORA_KEY.match(key.removeprefix(KEY_PREFIX)) if isinstance(key, str) else None
    if m is None:
        raise ValueError(
            f"split_peft_key: expected a key like 'base_model.model.<module>.lora_A.weight' "
            f"or '<module>.lora_B.<adapter>.weight', got {key!r}"
        )
    return m.group("module"), m.group("part")
