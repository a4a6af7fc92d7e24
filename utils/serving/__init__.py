"""server.py's OpenAI-compatible API, in three layers:

    protocol.py   request parsing and validation, OpenAI-shaped errors, SSE framing (no torch, no web stack)
    engine.py     the loaded models (base + adapters, through utils/loader.py's pieces) and the generation worker
    batcher.py    step-level continuous batching of the worker: one forward pass serves many requests
    streaming.py  one answer's text as it grows: stop strings, what can be streamed already
    routes.py     the FastAPI app (the only module that imports fastapi)

utils/server.py is the entry point (`serve`) and re-exports what callers import.
"""
