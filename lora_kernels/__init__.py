"""lora_kernels: fused LoRA matmul kernels for PyTorch."""

__version__ = "0.1.0"
