"""What a model's engine will take per device, from the model's own files (memory = "auto").

shape.py     config.json -> the figures that size a model (layers, KV heads, dtypes, ...)
estimate.py  a shape and the launch's settings -> weights + KV cache + workspace + overhead

No import from vllmd.config: the config's checks use this package (like vllmd.weights).
"""

from vllmd.sizing.estimate import Estimate, Settings, Sizing, estimate, largest_fitting_len
from vllmd.sizing.shape import ModelShape, Unsized, read_shape

__all__ = [
    "Estimate",
    "ModelShape",
    "Settings",
    "Sizing",
    "Unsized",
    "estimate",
    "largest_fitting_len",
    "read_shape",
]
