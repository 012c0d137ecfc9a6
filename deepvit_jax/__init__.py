"""deepvit-jax: DeepViT (Re-attention vision transformers) in JAX / Flax NNX."""

import os as _os
import sys as _sys

# TensorFlow and XLA read TF_CPP_MIN_LOG_LEVEL once, when they first log (TensorFlow at its
# import, e.g. its oneDNN notice): keep their C++ INFO / WARNING notices off every command's
# console unless --verbose (or DEEPVIT_VERBOSE=1) asks for them. Set here, before any
# submodule can import TensorFlow; 2 keeps their errors.
if "--verbose" not in _sys.argv[1:] and not _os.environ.get("DEEPVIT_VERBOSE"):
    _os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Newer TensorFlow prints its import-time notices whatever that says (tf_notices.py).
    from deepvit_jax import tf_notices as _tf_notices

    _tf_notices.install()

from deepvit_jax.models import (DeepViT, ModelConfig, count_params, create_model, get_config,
                                list_models)

__version__ = "0.1.0"
__all__ = ["DeepViT", "ModelConfig", "count_params", "create_model", "get_config",
           "list_models"]
