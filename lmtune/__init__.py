"""lmtune: fine-tune, evaluate and report pretrained language models from a labeled file."""
__version__ = "0.1.0"

from lmtune.api import Run, load, train  # noqa: E402
from lmtune.config import Config, load_config  # noqa: E402
from lmtune.errors import InputError  # noqa: E402

__all__ = ["Config", "InputError", "Run", "load", "load_config", "train", "__version__"]
