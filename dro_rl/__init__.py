"""dro-rl: train a list-wise passage selector and a generator jointly with DRO, on TRL."""

from .config import DROConfig
from .trainer import DROTrainer

__all__ = ["DROConfig", "DROTrainer"]
