"""Test-wide settings: CPU only, Triton kernels run in the interpreter, no hub access."""

import os

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The unit tests run tiny models, for which a second OpenMP thread costs more than it brings, and CI machines may be
# shared: one thread keeps the suite's time predictable. (Benchmarks, not tests, measure speed.)
torch.set_num_threads(1)
