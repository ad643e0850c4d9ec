"""The session core: one session's rules, sans-I/O (no socket, no event loop, no clock read)."""
