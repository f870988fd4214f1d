"""Fake quantizers that reproduce, value for value, the quantization an export format applies."""
