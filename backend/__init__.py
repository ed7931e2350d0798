"""Fornax backend, the runtime: owns the model, its config and the HF/GGUF formats, loading, tokenizer, sampling,
generation, runners, training and `python -m backend`. Imports neither gradio nor `export`."""
from .models.config import PRESETS, ModelConfig
from .errors import FornaxError, GenerationError, ModelLoadError, TrainError, UnsupportedModelError
from .generation.generate import Completion, Delta, GenerationResult, Stream, Timings, TokenInfo
from .handle import ModelHandle
from .loading import DEFAULT_HUB_ID, DEFAULT_INSTALL, load, save_pretrained
from .models.transformer import Transformer
from .generation.sampling import SamplingParams, sample

__all__ = ["load", "save_pretrained", "ModelHandle", "ModelConfig", "PRESETS", "Transformer", "SamplingParams", "sample",
           "GenerationResult", "Completion", "Delta", "Stream", "Timings", "TokenInfo", "FornaxError",
           "ModelLoadError", "UnsupportedModelError", "GenerationError", "TrainError", "DEFAULT_HUB_ID", "DEFAULT_INSTALL"]
