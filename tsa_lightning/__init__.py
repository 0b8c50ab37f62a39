"""tsa-lightning: transformers whose tokens choose their own depth, trained with Lightning."""

from tsa_lightning.model import Routing, TSAConfig, TSATransformer
from tsa_lightning.module import TSALanguageModel
from tsa_lightning.runs import load_checkpoint

__all__ = ["Routing", "TSAConfig", "TSALanguageModel", "TSATransformer", "load_checkpoint"]
