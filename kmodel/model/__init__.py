"""The kmodel decoder family (K-EXAONE / Solar Open / EXAONE 4.0 / DeepSeek-V3 class)."""

from kmodel.model.decoder import Model, ModelOutput, build_model

__all__ = ["Model", "ModelOutput", "build_model"]
