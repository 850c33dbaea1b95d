"""Export: a pruned model written as a Hugging Face folder plus its `prunekit.json`.

`folder.py` writes the folder atomically (standard, per-layer or sliced layout);
`record.py` is what a run records about itself. May import surgery, models and the
cross-cutting root modules; never a method.
"""
