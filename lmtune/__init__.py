"""lmtune: fine-tune, evaluate and report pretrained language models from a labeled file."""
__version__ = "0.1.0"

from lmtune.api import Run, load, train
from lmtune.config import Config, load_config
from lmtune.errors import InputError

__all__ = ["Config", "InputError", "Run", "__version__", "load", "load_config", "train"]
