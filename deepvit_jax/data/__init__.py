"""Input pipeline: TFDS datasets -> augmented, globally sharded batches (dataset.py resolves
the dataset; train_stream.py and eval_stream.py stream it)."""

from deepvit_jax.data.config import default_data_config, digits_data_config
from deepvit_jax.data.dataset import DatasetInfo, ImageSpec, dataset_info
from deepvit_jax.data.eval_stream import make_eval_iterator
from deepvit_jax.data.mix import mix_batch
from deepvit_jax.data.preprocess import eval_preprocess
from deepvit_jax.data.train_stream import make_train_iterator

__all__ = ["DatasetInfo", "ImageSpec", "dataset_info", "default_data_config",
           "digits_data_config", "eval_preprocess", "make_eval_iterator", "make_train_iterator",
           "mix_batch"]
