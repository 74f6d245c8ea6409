"""dro-rl: train a list-wise passage selector and a generator jointly with DRO, on TRL."""

import logging
import warnings

# bitsandbytes' CPU backend logs at import, on every CPU machine, that it found no optional `kernels` package for
# 4-bit matmuls; dro-rl trains 4-bit models only on a GPU (refused on CPU), so the line is noise that reads like a
# missing install step. Set before the imports below, which import bitsandbytes.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# TRL 1.16 names gradient checkpointing as transformers 5.24 used to (the `gradient_checkpointing` setting, its
# default True; `gradient_checkpointing_enable`, `is_gradient_checkpointing`), and transformers warns at every use
# that the names go in v6, which pyproject.toml's pins exclude: four warnings per run about nothing a user can change.
warnings.filterwarnings("ignore", r"`(is_)?gradient_checkpointing\w*` is deprecated and will be removed in v6",
                        FutureWarning)

from .config import DROConfig  # noqa: E402
from .inference import DROPipeline, Prediction  # noqa: E402
from .trainer import DROTrainer  # noqa: E402

__all__ = ["DROConfig", "DROPipeline", "DROTrainer", "Prediction"]
