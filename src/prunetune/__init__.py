"""prunetune: structured pruning and memory-efficient LoRA for Hugging Face decoder LLMs."""

import warnings

from .errors import UserError
from .models import load_model

__version__ = "0.1.0"
__all__ = ["UserError", "load_model", "__version__"]

# PEFT's PeftModel reads transformers' deprecated `is_gradient_checkpointing` every time an adapter
# is created or loaded (transformers 5.2x); the warning is PEFT's to fix and says nothing to our users.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
