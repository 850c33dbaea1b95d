"""Depth: whole decoder blocks removed or merged (ShortGPT, angular distance, SLEB,
Shortened LLaMA, LaCo); driver `base.py`."""
