"""``ModulesToSaveWrapper``: a module trained whole per adapter (PEFT's ``modules_to_save``)."""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["ModulesToSaveWrapper"]


class ModulesToSaveWrapper(nn.Module):
    """A module trained whole per adapter (PEFT's ``modules_to_save``), with PEFT's layout:
    ``original_module`` (frozen) and ``modules_to_save[adapter]`` (a trainable copy).

    The forward runs the active adapter's copy, or the original when no adapter of this wrapper
    is active. Attributes not found on the wrapper are read from the module it runs.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.original_module = module
        self.modules_to_save = nn.ModuleDict()
        self.active_adapter: str | None = None

    def add_adapter(self, name: str) -> None:
        self.modules_to_save[name] = copy.deepcopy(self.original_module)

    def _running(self) -> nn.Module:
        if self.active_adapter in self.modules_to_save:
            return self.modules_to_save[self.active_adapter]
        return self.original_module

    def forward(self, *args, adapter_names: list[str] | None = None, **kwargs):
        if adapter_names is None:
            return self._running()(*args, **kwargs)
        # A mixed batch: rows grouped by adapter, each group through its own copy.
        x, rest = args[0], args[1:]
        out = None
        for name in dict.fromkeys(adapter_names):
            rows = torch.tensor(
                [i for i, n in enumerate(adapter_names) if n == name], device=x.device
            )
            if name in self.modules_to_save:
                y = self.modules_to_save[name](x[rows], *rest, **kwargs)
            else:
                y = self.original_module(x[rows], *rest, **kwargs)
            if out is None:
                out = y.new_empty((x.shape[0], *y.shape[1:]))
            out[rows] = y
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("original_module", "modules_to_save", "active_adapter") or (
                "_modules" not in self.__dict__
            ):
                raise
            return getattr(self._running(), name)
