"""edgekd: distill, quantize and export a language model for a device, with measured quality."""

__version__ = "0.1.0"
