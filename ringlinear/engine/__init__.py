"""Inference engine: hybrid cache (paged KV for softmax layers, fp32 state slots for linear layers),
continuous batching with chunked prefill and preemption, sampling, offline `LLM` API and HTTP server."""
