"""The session core: the rules of one session, sans-I/O (no socket, no event loop, no clock read)."""
