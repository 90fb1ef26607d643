"""cospec: a large and a small language model decoding together (speculative decoding, logit fusion)."""

from cospec.decoding.fusion import FusionSpec, parse_fusion
from cospec.engine.config import EngineConfig, FusionConfig, SpeculativeConfig
from cospec.engine.llm import LLM
from cospec.engine.llm_engine import LLMEngine
from cospec.engine.sampling_params import SamplingParams
from cospec.engine.sequence import RequestOutput, RequestStats

__version__ = "0.1.0"

__all__ = ["LLM", "LLMEngine", "EngineConfig", "SpeculativeConfig", "FusionConfig", "FusionSpec", "parse_fusion", "SamplingParams", "RequestOutput", "RequestStats", "__version__"]

from cospec.engine.generate import UnsupportedArgumentError, generate, patch, unpatch  # noqa: E402

__all__ += ["generate", "patch", "unpatch", "UnsupportedArgumentError"]

from cospec.training.train_draft import TrainConfig, train_draft  # noqa: E402

__all__ += ["train_draft", "TrainConfig"]
