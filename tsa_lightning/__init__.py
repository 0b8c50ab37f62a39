"""tsa-lightning: transformers whose tokens choose their own depth, trained with Lightning."""

from tsa_lightning.model import Routing, TSAConfig, TSATransformer

__all__ = ["Routing", "TSAConfig", "TSATransformer"]
