"""Which array library holds some data: NumPy, or CuPy for arrays on an NVIDIA GPU.

The lowest module of the package: the engine, the activations and the optimizers all take their array module
from the data through `array_module`, so the same code runs on either library and CuPy is imported only when a
CuPy array is actually seen.
"""
import numpy as np


def array_module(*arrays):
    """NumPy, or CuPy when any argument is a CuPy array (CuPy is never imported otherwise)."""
    for a in arrays:
        if type(a).__module__.startswith("cupy"):
            import cupy

            return cupy
    return np
