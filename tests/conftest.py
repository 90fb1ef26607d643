"""Test-wide settings: CPU only, Triton kernels run in the interpreter, no hub access."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

# Must be set before triton is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# The unit tests run tiny models, for which a second OpenMP thread costs more than it brings, and CI machines may be
# shared: one thread keeps the suite's time predictable. (Benchmarks, not tests, measure speed.)
torch.set_num_threads(1)

# CPU row plans (cospec.engine.cpu_plans) are stored in a cache directory of this session, so that no test depends on
# what earlier runs stored; converted models are shared with the real cache directory through a link.
_real_cache = Path(os.environ.get("COSPEC_CACHE_DIR", Path.home() / ".cache" / "cospec"))
_session_cache = Path(tempfile.mkdtemp(prefix="cospec-tests-"))
(_real_cache / "models").mkdir(parents=True, exist_ok=True)
(_session_cache / "models").symlink_to(_real_cache / "models", target_is_directory=True)
os.environ["COSPEC_CACHE_DIR"] = str(_session_cache)
atexit.register(shutil.rmtree, _session_cache, ignore_errors=True)
