"""prunetune: structured pruning and memory-efficient LoRA for Hugging Face decoder LLMs."""

__version__ = "0.1.0"

from .errors import UserError
from .models import load_model

__all__ = ["UserError", "load_model", "__version__"]
