"""Evaluation: perplexity (and zero-shot tasks)."""

from prunekit.eval.perplexity import PerplexityResult, perplexity

__all__ = ["PerplexityResult", "perplexity"]
