"""Files other tools read: GGUF for llama.cpp (gguf.py)."""
