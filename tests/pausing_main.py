"""``python -m deepvit_jax.main`` with a pause, for the resume tests (the pause lives here,
not in the product): after step ``$PAUSE_AT_STEP`` and its checkpoint (waited for), write
``WORKDIR/paused_at_<step>`` and wait until SIGTERM (or kill -9)."""

import os
import time

from deepvit_jax import main as main_lib
from deepvit_jax.train import loop

PAUSE_AT = int(os.environ["PAUSE_AT_STEP"])
_train_and_evaluate = loop.train_and_evaluate


def _pausing(config, workdir, **kw):
    def on_step(step, run):
        if step == PAUSE_AT:
            run.checkpointer.wait()
            open(os.path.join(workdir, f"paused_at_{step}"), "w").close()
            while not run.preemption.flag:
                time.sleep(0.05)

    return _train_and_evaluate(config, workdir, on_step=on_step, **kw)


# main imports the function by name: patch the name it calls.
loop.train_and_evaluate = main_lib.train_and_evaluate = _pausing

if __name__ == "__main__":
    main_lib.run()
