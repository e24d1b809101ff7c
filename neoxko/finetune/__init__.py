"""Instruction fine-tuning: data and templates (data.py), LoRA in peft's format (lora.py), settings (config.py), and
the job the training loop runs (job.py)."""
