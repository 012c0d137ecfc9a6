"""Input pipeline: TFDS datasets -> augmented, globally sharded batches (see pipeline.py)."""

from deepvit_jax.data.config import default_data_config, digits_data_config
from deepvit_jax.data.mix import mix_batch
from deepvit_jax.data.pipeline import (DatasetInfo, dataset_info, make_eval_iterator,
                                       make_train_iterator)
from deepvit_jax.data.preprocess import eval_preprocess

__all__ = ["DatasetInfo", "dataset_info", "default_data_config", "digits_data_config",
           "eval_preprocess", "make_eval_iterator", "make_train_iterator", "mix_batch"]
