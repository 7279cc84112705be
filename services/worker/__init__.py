"""The worker: a vLLM engine fed from a model topic with many requests in flight."""
