"""IBM Granite 3: Llama's layout; its scalar multipliers (embedding, residual, attention, logits) do not
depend on the number of heads or channels, so a cut leaves them as they are."""

from .base import Family

GRANITE = Family("Granite", ("granite",))
