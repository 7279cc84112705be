"""Switchyard's services: router, worker and sink, the local stack that runs them, and the CLI."""
