"""Saving and loading EAGLE-3 heads in the two layouts in use.

- speculators (what vLLM loads; what cospec writes): ``config.json`` with ``speculators_model_type: "eagle3"``,
  ``architectures: ["Eagle3Speculator"]``, the decoder layer's config as ``transformer_layer_config``,
  ``draft_vocab_size``, ``target_hidden_size``, ``eagle_aux_hidden_state_layer_ids``, ``norm_before_residual`` and a
  ``speculators_config`` (algorithm, proposal methods, verifier); weights ``fc.weight``, ``layers.0.*``,
  ``norm.weight``, ``lm_head.weight``, ``d2t``, ``t2d`` in ``model.safetensors``.
- the original EAGLE-3 repository: a plain Llama ``config.json`` (one layer) with ``draft_vocab_size``; the decoder
  layer's weights under ``midlayer.*``; ``pytorch_model.bin`` or ``model.safetensors``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import LlamaConfig

from cospec.decoding.eagle3 import Eagle3Head, default_aux_layer_ids

WEIGHTS_NAME = "model.safetensors"


class DraftHeadNotFoundError(FileNotFoundError):
    pass


def save_head(head: Eagle3Head, directory: str | Path, verifier_name: str | None = None,
              verifier_architectures: list[str] | None = None, num_speculative_tokens: int = 3) -> Path:
    """Write ``head`` in the speculators layout (float weights in the head's dtype); returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    dtype = next(head.parameters()).dtype
    layer_config = head.config.to_diff_dict()
    config = {
        "architectures": ["Eagle3Speculator"],
        "speculators_model_type": "eagle3",
        "transformer_layer_config": layer_config,
        "draft_vocab_size": head.draft_vocab_size,
        "target_hidden_size": head.target_hidden_size,
        "eagle_aux_hidden_state_layer_ids": list(head.aux_layer_ids),
        "norm_before_residual": head.norm_before_residual,  # always written: vLLM reads a missing value as True
        "torch_dtype": str(dtype).removeprefix("torch."),
        "speculators_config": {
            "algorithm": "eagle3",
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": num_speculative_tokens,
                                  "verifier_accept_k": 1, "accept_tolerance": 0.0}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier_name, "architectures": list(verifier_architectures or [])},
        },
    }
    state = {name: tensor.detach().contiguous().cpu() for name, tensor in head.state_dict().items()}
    save_file(state, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return directory


def load_head(path: str | Path, target: nn.Module) -> Eagle3Head:
    """The head saved at ``path`` (either layout), in the target's dtype and device, checked against ``target`` and
    bound to it. A head made for another model raises ValueError naming the mismatch."""
    path = Path(path).expanduser()
    config_path = path / "config.json"
    if not config_path.exists():
        raise DraftHeadNotFoundError(f"no draft head at {path} (expected a directory with config.json)")
    config = json.loads(config_path.read_text())
    weights = _load_weights(path)
    text = target.config.get_text_config()
    if "speculators_model_type" in config:
        head = _from_speculators(config, weights, text.num_hidden_layers)
    elif "draft_vocab_size" in config:
        head = _from_eagle_repository(config, weights, text.num_hidden_layers)
    else:
        raise ValueError(f"{config_path} is not an EAGLE-3 head: it has neither speculators_model_type nor "
                         "draft_vocab_size")
    weight = target.get_output_embeddings().weight
    return head.to(weight.device, weight.dtype).bind(target).eval()


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    if (path / WEIGHTS_NAME).exists():
        return load_file(str(path / WEIGHTS_NAME))
    if (path / "pytorch_model.bin").exists():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise DraftHeadNotFoundError(f"no weights in {path} (expected {WEIGHTS_NAME} or pytorch_model.bin)")


def _from_speculators(config: dict, weights: dict, num_target_layers: int) -> Eagle3Head:
    if config["speculators_model_type"] != "eagle3":
        raise ValueError(f"cospec loads EAGLE-3 heads; this checkpoint is a {config['speculators_model_type']!r} "
                         "speculator")
    layer = dict(config.get("transformer_layer_config") or {})
    if layer.get("model_type", "llama") != "llama":
        raise ValueError(f"cospec's EAGLE-3 head is a Llama decoder layer; this one is {layer['model_type']!r}")
    aux = config.get("eagle_aux_hidden_state_layer_ids") or default_aux_layer_ids(num_target_layers)
    # vLLM reads a missing norm_before_residual as True (speculators always writes it).
    return _build(LlamaConfig(**layer), config, weights, aux, config.get("norm_before_residual", True))


def _from_eagle_repository(config: dict, weights: dict, num_target_layers: int) -> Eagle3Head:
    weights = {name.replace("midlayer.", "layers.0.", 1): w for name, w in weights.items()}
    layer = {k: v for k, v in config.items() if k not in ("architectures", "draft_vocab_size", "target_hidden_size")}
    aux = config.get("eagle_aux_hidden_state_layer_ids") or default_aux_layer_ids(num_target_layers)
    return _build(LlamaConfig(**layer), config, weights, aux, config.get("norm_before_residual", False))


def _build(layer_config: LlamaConfig, config: dict, weights: dict, aux_layer_ids,
           norm_before_residual: bool) -> Eagle3Head:
    if "fc.weight" not in weights or "lm_head.weight" not in weights:
        raise ValueError("the checkpoint lacks fc.weight or lm_head.weight: not an EAGLE-3 head")
    draft_vocab_size = config.get("draft_vocab_size") or weights["lm_head.weight"].shape[0]
    target_hidden_size = config.get("target_hidden_size") or weights["fc.weight"].shape[1] // len(aux_layer_ids)
    if weights["fc.weight"].shape[1] != len(aux_layer_ids) * target_hidden_size:
        raise ValueError(f"fc.weight takes {weights['fc.weight'].shape[1]} inputs, not {len(aux_layer_ids)} aux "
                         f"layers x target hidden size {target_hidden_size}")
    layer_config.num_hidden_layers = 1
    head = Eagle3Head(layer_config, draft_vocab_size, target_hidden_size, tuple(aux_layer_ids), norm_before_residual,
                      own_embeddings="embed_tokens.weight" in weights)
    state = {name: w for name, w in weights.items() if name in head.state_dict()}
    if "d2t" not in weights and draft_vocab_size != layer_config.vocab_size:
        raise ValueError("the checkpoint's draft vocabulary is smaller than the target's but it has no d2t mapping")
    missing = set(head.state_dict()) - set(state) - {"d2t", "t2d"}
    if missing:
        raise ValueError(f"the checkpoint lacks {sorted(missing)}")
    head.load_state_dict(state, strict=False)
    if "d2t" in weights and "t2d" not in weights:  # t2d follows from d2t
        head.set_draft_vocabulary(head.to_target_ids(torch.arange(draft_vocab_size)))
    return head
