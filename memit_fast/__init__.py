"""memit_fast: mass-editing memory in transformer language models (MEMIT), batched."""

from memit_fast.config import EditConfig, auto_config, preset
from memit_fast.data import EditRequest, EditRequestError

__version__ = "0.1.0"

__all__ = [
    "EditConfig",
    "EditRequest",
    "EditRequestError",
    "auto_config",
    "preset",
]
