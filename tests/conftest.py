import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

# The hub is out of reach in CI; fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
