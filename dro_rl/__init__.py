"""dro-rl: train a list-wise passage selector and a generator jointly with DRO, on TRL."""

import logging

# bitsandbytes' CPU backend logs at import, on every CPU machine, that it found no optional `kernels` package for
# 4-bit matmuls; dro-rl trains 4-bit models only on a GPU (refused on CPU), so the line is noise that reads like a
# missing install step. Set before the imports below, which import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

from .config import DROConfig  # noqa: E402
from .inference import DROPipeline, Prediction  # noqa: E402
from .trainer import DROTrainer  # noqa: E402

__all__ = ["DROConfig", "DROPipeline", "DROTrainer", "Prediction"]
