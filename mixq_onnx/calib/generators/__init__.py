"""Generator registry: `GENERATORS[name]`. Importing this package imports every module that
`mixq_onnx.registry.GENERATOR_MODULES` names, and each registers its generator (heavy libraries such as
diffusers load lazily inside them)."""
import importlib

from ...registry import GENERATOR_MODULES
from .base import GENERATORS, GenContext, Generator, ShardOutput, register

for _entry in GENERATOR_MODULES.values():
    importlib.import_module(_entry.module)

__all__ = ["GENERATORS", "GenContext", "Generator", "ShardOutput", "register"]
