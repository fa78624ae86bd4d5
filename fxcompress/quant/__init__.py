"""Quantization runtime."""
