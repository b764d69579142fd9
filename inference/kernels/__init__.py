"""Where the workers go below transformers' public API: a decode attention that reads
grouped KV heads without copying them, oneDNN-packed linear weights, and a KV cache
with room to grow. Each subclasses or patches transformers internals of the minor
version pinned in pyproject.toml."""
