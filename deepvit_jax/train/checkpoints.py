"""Training checkpoints: an Orbax ``CheckpointManager`` in ``WORKDIR/checkpoints``.

Each checkpoint ``checkpoints/<step>/`` holds three items:

* ``state`` - the :class:`~deepvit_jax.train.state.TrainState` (parameters, BatchNorm
  statistics, optimizer, EMA, RNG key, step), saved sharded by every process;
* ``data``  - the training iterator's position (JSON, ``iterator.get_state()``);
* ``meta``  - the run config and model config (JSON), for humans and tools.

Saves are asynchronous. Orbax writes into a temporary directory and renames it when every
item is complete, so a checkpoint cut short by ``kill -9`` is never listed (and its leftovers
are removed on the next start). Retention: the last ``keep`` checkpoints plus the best one by
``best_metric`` (checkpoints saved at an evaluation carry the eval metrics).
"""

from __future__ import annotations

import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger(__name__)


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, best_metric: str = "eval/top1",
                 async_save: bool = True):
        self.directory = epath.Path(directory)
        self.best_metric = best_metric
        policy = ocp.checkpoint_managers.AnyPreservationPolicy([
            ocp.checkpoint_managers.LatestN(n=max(int(keep), 1)),
            ocp.checkpoint_managers.BestN(
                get_metric_fn=lambda m: float(m[best_metric]), reverse=False, n=1,
                keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy, create=True, cleanup_tmp_directories=True,
            enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, meta: dict,
             metrics: dict | None = None) -> bool:
        if step in self.manager.all_steps():
            return False
        if metrics is not None and self.best_metric not in metrics:
            metrics = None
        args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                                  data=ocp.args.JsonSave(data_state),
                                  meta=ocp.args.JsonSave(meta))
        saved = self.manager.save(step, args=args, metrics=metrics, force=True)
        if saved:
            log.info("checkpoint: saving step %d to %s (async)", step, self.directory)
        return saved

    def restore(self, step: int, abstract_state) -> tuple[Any, dict, dict]:
        """(state, data_state, meta) of ``step``; ``abstract_state`` is a tree of
        ``jax.ShapeDtypeStruct`` with shardings (where the arrays will be placed)."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                  data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore())
        out = self.manager.restore(step, args=args)
        return out["state"], out["data"], out["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with shardings, the restore target for ``tree``."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
