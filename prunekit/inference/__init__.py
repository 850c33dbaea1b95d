"""Inference-time features that change how a model runs, not its weights (early exit).

May import models and the cross-cutting root modules; never a method.
"""
