"""What a run depends on: versions, the device and the kernel backends (``cospec info`` prints it; benchmarks record
it)."""

from __future__ import annotations

import platform
from importlib import metadata


def environment() -> dict[str, str]:
    import torch

    import cospec
    from cospec.engine.cpu_plans import cpu_name
    from cospec.kernels import backend_name

    return {
        "cospec": cospec.__version__,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
        "triton": _version("triton"),
        "python": platform.python_version(),
        "cpu": cpu_name(),
        "threads": str(torch.get_num_threads()),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "not available",
        "kernels (cpu)": backend_name("cpu"),
        "kernels (cuda)": backend_name("cuda"),
    }


def _version(dist: str) -> str:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "not installed"

