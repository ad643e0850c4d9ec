"""Transports: adapters that feed the session core and carry out its decisions on sockets."""
