"""The collapse measures of a checkpoint path (model directory, training workdir or one
training checkpoint) over the first N images of a split."""

from __future__ import annotations

import numpy as np

from deepvit_jax import saved_run
from deepvit_jax.analysis import similarity as sim
from deepvit_jax.analysis.collect import analyse
from deepvit_jax.data.dataset import ImageSpec, dataset_info
from deepvit_jax.data.eval_stream import make_eval_iterator


def load_images(data_cfg, model_cfg, num_images: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels): the first ``num_images`` of ``data_cfg``'s eval split, preprocessed
    for ``model_cfg`` (the evaluation transform), on the host."""
    if num_images < 1:
        raise ValueError(f"num_images={num_images}: must be >= 1")
    ds = dataset_info(data_cfg)
    n = min(int(num_images), ds.num_eval)
    it = make_eval_iterator(data_cfg, global_batch_size=n, spec=ImageSpec.of(model_cfg),
                            sharding=None, dataset=ds, process_index=0, process_count=1)
    batch = next(iter(it))
    keep = batch["mask"] > 0
    return batch["image"][keep], batch["label"][keep]


def analyse_checkpoint(path: str, *, step: int | None = None, ema: bool = False,
                       num_images: int = 64, dataset: str | None = None,
                       split: str | None = None, data_dir: str | None = None, k: int = 1,
                       threshold: float = sim.DEFAULT_THRESHOLD, batch_size: int = 32,
                       center: bool = False, return_model: bool = False):
    """:func:`~deepvit_jax.analysis.analyse` of the weights at ``path`` over the first
    ``num_images`` images of the split (the run's eval split for a training checkpoint;
    ``dataset`` is required for a model directory), plus what was analysed. With
    ``return_model``: ``(result, model, images)`` for :func:`plot_attention`."""
    loaded = saved_run.load_checkpoint(path, step)
    config = saved_run.eval_config(loaded, dataset=dataset, split=split, data_dir=data_dir)
    model = loaded.model(ema=ema)
    images, _ = load_images(config.data, loaded.model_cfg, num_images)
    result = analyse(model, images, k=k, threshold=threshold, batch_size=batch_size,
                     center=center)
    result = {"checkpoint": loaded.source.path, "step": loaded.source.step, "ema": bool(ema),
              "model": loaded.model_cfg.name,
              "reattn_blocks": list(loaded.model_cfg.reattn_indices),
              "dataset": str(config.data.dataset), **result}
    return (result, model, images) if return_model else result
