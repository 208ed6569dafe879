"""Neural network modules: the packed transformer, its attention backends, and what attaches to it from
outside: step caches (caches.py), LoRA adapters (lora.py), fp8 weight storage (quant.py)."""
