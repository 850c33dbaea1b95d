"""Allocation modules; each registers itself with `prunekit.allocation` on import."""
