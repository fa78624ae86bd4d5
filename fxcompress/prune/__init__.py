"""Channel pruning analyses and slicing."""
