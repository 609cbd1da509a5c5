"""kmodel: from-scratch training of Korean MoE + hybrid-attention foundation models."""

from kmodel.checkpoint import load_model
from kmodel.config import Config, ConfigError, load_config

__all__ = ["Config", "ConfigError", "load_config", "load_model"]
__version__ = "0.1.0"
