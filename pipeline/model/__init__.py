"""Models: the trunk(s) and a registry of parts. Build one with `build_model(cfg.model)`."""

from pipeline.model.registry import build_model

__all__ = ["build_model"]
