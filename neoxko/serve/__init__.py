"""Serving, by layer: protocol.py (the OpenAI/vLLM wire format, no sockets) and responses.py (engine events to
response bodies), app.py (the FastAPI app), server.py (uvicorn, its limits, the graceful stop), engine.py and
prefix.py (continuous batching over one KV cache)."""
