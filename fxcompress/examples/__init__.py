"""Bundled examples (the digits dataset and small CNNs)."""
