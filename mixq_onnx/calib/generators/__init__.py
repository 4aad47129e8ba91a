"""Generator registry: `GENERATORS[name]`. Importing this package registers every generator
(their modules import heavy libraries such as diffusers lazily)."""
from . import diffusion, inversion, noise, real  # noqa: F401,E402
from .base import GENERATORS, GenContext, Generator, ShardOutput, register

__all__ = ["GENERATORS", "GenContext", "Generator", "ShardOutput", "register"]
