"""Engine tests run in the engines venv (``.ci/engines_setup.sh``), where vLLM and SGLang are
installed without their GPU-only dependencies; elsewhere each module skips at import.

vLLM decides its platform when it is first imported: its CPU platform (torch ops, no pinned
memory) is the one this machine can run, and its ``PunicaWrapperCPU`` is the oracle.
"""

from __future__ import annotations

import os

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
