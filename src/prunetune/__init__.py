"""prunetune: structured pruning and memory-efficient LoRA for Hugging Face decoder LLMs."""

import warnings

from .errors import UserError

__version__ = "0.1.0"
__all__ = ["UserError", "load_model", "__version__"]


def __getattr__(name: str):
    # `prunetune.load_model` imports torch on first use, so `import prunetune` (and the CLI's --help
    # and argument errors) stay fast.
    if name == "load_model":
        from .models import load_model

        return load_model
    raise AttributeError(f"module 'prunetune' has no attribute {name!r}")


# PEFT's PeftModel reads transformers' deprecated `is_gradient_checkpointing` every time an adapter
# is created or loaded (transformers 5.2x); the warning is PEFT's to fix and says nothing to our users.
warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
