"""Chaos drills: the local stack under a steady mixed load, one injected fault at a time, and the
promises checked after each: every request answered once, billed once, and the stack recovered
by itself (`switchyard chaos`, `scripts/chaos`, docs/chaos.md)."""
