"""Authentication: who a client is (key, JWT, `ek_` token), its tier, and its Origin."""
