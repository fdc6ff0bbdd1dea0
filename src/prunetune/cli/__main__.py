"""`python -m prunetune.cli`, the form `accelerate launch -m prunetune.cli` and the tests use."""

from . import main

main()
