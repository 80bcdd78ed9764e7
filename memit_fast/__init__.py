"""memit_fast: mass-editing memory in transformer language models (MEMIT), batched."""

from memit_fast.artifacts import LoadedEdit, load_edit, save_edit, to_peft
from memit_fast.config import EditConfig, auto_config, preset
from memit_fast.data import EditRequest, EditRequestError
from memit_fast.editor import EditFailedError, Editor, EditResult

__version__ = "0.1.0"

__all__ = [
    "EditConfig",
    "EditFailedError",
    "EditRequest",
    "EditRequestError",
    "EditResult",
    "Editor",
    "LoadedEdit",
    "auto_config",
    "load_edit",
    "preset",
    "save_edit",
    "to_peft",
]
