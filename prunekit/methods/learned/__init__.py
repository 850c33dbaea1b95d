"""Learned structured pruning: hard-concrete masks over heads, channels and blocks."""
