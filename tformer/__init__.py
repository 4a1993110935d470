"""tformer: Transformer blocks where the placement of normalization is a first-class design axis.

Any registered norm (``NORMS``) goes in any registered placement (``PLACEMENTS``) around
attention on any backend (``BACKENDS``); see ``BlockConfig``.
"""

# Modules that register entries of the norm and placement registries (importing them registers them).
from . import rmsnorm, powernorm, batchnorm, stack_placements  # noqa: I001  (registration first)
from . import analysis, convert, data
from .backends import BACKENDS
from .blocks import DecoderBlock, EncoderBlock, TransformerBlock, debug_checks, get_debug_checks, set_debug_checks
from .checkpoint import load, read_metadata, save
from .config import BlockConfig
from .deepnorm import deepnorm_constants
from .errors import CheckpointError, ConfigError, UnsupportedArgumentError
from .feedforward import ACTIVATIONS
from .init import INIT_SCHEMES
from .interop import UnsupportedLayerError, from_torch
from .embeddings import POSITIONS
from .hf import from_hf, to_hf  # transformers is imported only when they run
from .models import EncoderDecoder, EncoderModel, LanguageModel
from .norms import NORMS, make_norm
from .placements import PLACEMENTS, LayerContext, ResidualPlacement
from .stack_placements import hyper_connections
from .schedulers import SCHEDULERS, make_scheduler
from .stacks import Decoder, Encoder
from .switch_placement import with_placement

from ._version import __version__

__all__ = [
    "ACTIVATIONS",
    "BACKENDS",
    "INIT_SCHEMES",
    "NORMS",
    "PLACEMENTS",
    "POSITIONS",
    "SCHEDULERS",
    "BlockConfig",
    "CheckpointError",
    "ConfigError",
    "Decoder",
    "DecoderBlock",
    "Encoder",
    "EncoderBlock",
    "EncoderDecoder",
    "EncoderModel",
    "LanguageModel",
    "LayerContext",
    "ResidualPlacement",
    "TransformerBlock",
    "UnsupportedArgumentError",
    "UnsupportedLayerError",
    "debug_checks",
    "deepnorm_constants",
    "from_hf",
    "from_torch",
    "get_debug_checks",
    "hyper_connections",
    "make_norm",
    "make_scheduler",
    "load",
    "read_metadata",
    "save",
    "set_debug_checks",
    "with_placement",
    "to_hf",
]
