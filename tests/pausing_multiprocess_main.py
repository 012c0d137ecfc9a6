"""``python -m deepvit_jax.main`` for the multi-process stop test (the pause lives here, not in
the product): after step ``$PAUSE_AT_STEP`` and its checkpoint (waited for), process ``i``
writes ``WORKDIR/paused_<i>`` and waits for ``WORKDIR/go``; the test signals one process,
then writes ``go``. Both processes must then stop at the same step (the loop OR-s the
preemption flag across processes)."""

import os
import time

import jax

from deepvit_jax import main as main_lib
from deepvit_jax.train import loop

PAUSE_AT = int(os.environ["PAUSE_AT_STEP"])
_train_and_evaluate = loop.train_and_evaluate


def _pausing(config, workdir, **kw):
    def on_step(step, run):
        if step == PAUSE_AT:
            run.checkpointer.wait()
            open(os.path.join(workdir, f"paused_{jax.process_index()}"), "w").close()
            while not os.path.exists(os.path.join(workdir, "go")):
                time.sleep(0.05)

    return _train_and_evaluate(config, workdir, on_step=on_step, **kw)


# main imports the function by name: patch the name it calls.
loop.train_and_evaluate = main_lib.train_and_evaluate = _pausing

if __name__ == "__main__":
    main_lib.run()
