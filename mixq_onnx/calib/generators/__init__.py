"""Generator registry: `GENERATORS[name]`. Importing this package registers every generator."""
from .base import GENERATORS, GenContext, Generator, ShardOutput, register
from . import noise, real  # noqa: F401

try:  # these import heavy libraries lazily; their modules are cheap
    from . import diffusion  # noqa: F401
except ImportError:  # pragma: no cover
    pass
try:
    from . import inversion  # noqa: F401
except ImportError:  # pragma: no cover
    pass

__all__ = ["GENERATORS", "GenContext", "Generator", "ShardOutput", "register"]
