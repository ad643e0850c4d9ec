"""Limits: per-tier concurrent sessions as leases, in process or in Redis."""
