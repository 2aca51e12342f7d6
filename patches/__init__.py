"""Diffs that add `--token_elision` to upstream `train.py` files (`regate patch apply`); data only."""
