"""dro-rl: train a list-wise passage selector and a generator jointly with DRO, on TRL."""

from .config import DROConfig
from .inference import DROPipeline, Prediction
from .trainer import DROTrainer

__all__ = ["DROConfig", "DROPipeline", "DROTrainer", "Prediction"]
