"""Structured width: heads / KV groups, MLP channels and the hidden dimension removed
(magnitude-SP, Wanda-SP, FLAP, LLM-Pruner, SliceGPT, Bonsai); driver `base.py`."""
