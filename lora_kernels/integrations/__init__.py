"""Bridges to other libraries. ``lora_kernels.integrations.peft`` runs an existing PEFT model's
LoRA Linear layers on our kernels; it imports ``peft`` only when imported itself."""
