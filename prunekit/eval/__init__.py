"""Evaluation: perplexity, zero-shot tasks, the lm-eval backend, LLM-Kick and speed timers.

May import models, data and the cross-cutting root modules; never a method.
"""

from prunekit.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
