"""Unstructured and N:M masks (magnitude, Wanda, SparseGPT, RIA, DaSS, ADMM, ALPS, BESA)
and the weight updates that re-fit kept weights (`updates/`); driver `layerwise.py`."""
