"""Surgery: changing a model's weights, shape or basis.

- `masks.py`: which weights to zero (per row / layer / N:M group) and sparsity counts;
- `width.py`: removing attention heads (whole KV groups) and MLP channels, added biases;
- `plan.py`: a block's structures, their parameter costs, and plans meeting a budget;
- `depth.py`: removing and merging whole decoder blocks;
- `rotate.py`: norm folding and orthogonal rotations of the residual stream (SliceGPT);
- `permutation.py`: input-channel permutations for N:M masks.

May import models and the cross-cutting root modules; never a method.
"""
