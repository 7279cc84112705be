"""The local stack: embedded broker and Redis, and the services as supervised child processes."""
