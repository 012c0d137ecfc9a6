"""``python -m deepvit_jax.main`` that kills itself with SIGKILL in the middle of one
operation, for tests/test_fault_injection.py (the kill points live here, not in the
product). ``$KILL_AT``:

* ``save:S``    - right after the asynchronous checkpoint save of step S started (Orbax is
                  still writing its temporary directory);
* ``metrics:S`` - halfway through appending step S's row to metrics.jsonl;
* ``eval``      - after the first batch of the first evaluation.
"""

import os
import signal

from deepvit_jax import main as main_lib
from deepvit_jax.data import eval_stream
from deepvit_jax import workdir as checkpoints
from deepvit_jax.train import reporting

KIND, _, STEP = os.environ["KILL_AT"].partition(":")


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


if KIND == "save":
    _save = checkpoints.Checkpointer.save

    def save(self, step, *args, **kw):
        out = _save(self, step, *args, **kw)
        if step == int(STEP):
            _die()
        return out

    checkpoints.Checkpointer.save = save
elif KIND == "metrics":
    _write = reporting.MetricWriter.write

    def write(self, step, metrics):
        if step == int(STEP) and self.enabled:
            import json

            line = json.dumps({"step": int(step), **{k: float(v) for k, v in metrics.items()}})
            with self.path.open("a") as f:
                f.write(line[: len(line) // 2])
                f.flush()
            _die()
        return _write(self, step, metrics)

    reporting.MetricWriter.write = write
elif KIND == "eval":
    _iter = eval_stream.EvalIterable.__iter__

    def eval_iter(self):
        for i, batch in enumerate(_iter(self)):
            if i == 1:
                _die()
            yield batch

    eval_stream.EvalIterable.__iter__ = eval_iter
else:
    raise SystemExit(f"KILL_AT={os.environ['KILL_AT']!r}: use save:S, metrics:S or eval")

if __name__ == "__main__":
    main_lib.run()
