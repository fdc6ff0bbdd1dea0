import os
import sys

sys.path.insert(0, os.path.dirname(__file__))  # tests/tiny.py

# The hub is out of reach in CI; fail fast instead of retrying the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Under pytest-xdist (`make test`) every worker gets one thread, and so do the CLI processes it
# starts: two workers with two threads each would fight over the two cores.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
