"""Models: PEFT's configuration, target matching, LoRA models and PEFT-format checkpoints.

``config`` (``LoraConfig``), ``targets`` (which modules a config adapts), ``modules_to_save``,
``model`` (``get_lora_model``, ``set_adapter``, ``mixed_batch``, ``merge_and_unload``, ...),
``checkpoint`` (``save_adapter`` / ``load_adapter``, PEFT's layout both ways).
"""
