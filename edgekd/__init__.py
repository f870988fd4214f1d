"""edgekd: distill, quantize and export a language model for a device, with measured quality."""

import logging

__version__ = "0.1.0"

# bitsandbytes offers, at import on AVX512-BF16 CPUs, a kernel it would download from the hub;
# its own kernel serves, and nothing is downloaded at run time. Set here, before any module of
# edgekd (or a script or test using it) can import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
