"""What the Colab notebooks (``colab/*.ipynb``) call besides the package's own APIs: the
runtime they run on, Google Drive, official weights, a training config sized for the runtime.

Each helper prints one line saying what it found and, when something is missing (no
accelerator, Drive not mounted, no weights file), what to do about it; it then carries on
where it can (CPU at small size, a local workdir, random weights). Nothing here needs Colab:
outside it the helpers say so and take the local path, which is how the tests run the
notebooks.

    from deepvit_jax import colab
    runtime = colab.detect_runtime()                   # "TPU v5 lite x1 ..." / "no accelerator ..."
    colab.mount_drive()                                # or a one-line reason it is not mounted
    workdir = colab.resolve_workdir("/content/drive/MyDrive/deepvit-jax/run")
    config = colab.training_config("auto", "imagenette", runtime=runtime)
    model = colab.load_weights("DViT_82_16b.pth.tar", "deepvit_s")
"""

from deepvit_jax.colab.display import (Analysed, analyse_checkpoints, classify, run_sweep,
                                      sample_image, show, show_attention,
                                      show_image_attention, show_similarity)
from deepvit_jax.colab.recipes import config_dir, load_config, prepare_dataset, training_config
from deepvit_jax.colab.runtime import (DRIVE_MOUNT, DRIVE_ROOT, Runtime, config_arg,
                                      detect_runtime, drive_or_local, in_colab,
                                      latest_checkpoint, mount_drive, resolve_workdir, say)
from deepvit_jax.colab.weights import (OFFICIAL_FILES, OFFICIAL_REPO, download_weights,
                                      find_weights, load_weights, upload_weights)

__all__ = ["DRIVE_MOUNT", "DRIVE_ROOT", "OFFICIAL_FILES", "OFFICIAL_REPO", "Analysed",
           "Runtime", "analyse_checkpoints", "classify", "config_arg", "config_dir",
           "detect_runtime", "download_weights", "drive_or_local", "find_weights", "in_colab",
           "latest_checkpoint", "load_config", "load_weights", "mount_drive",
           "prepare_dataset", "resolve_workdir", "run_sweep", "sample_image", "say", "show",
           "show_attention", "show_image_attention", "show_similarity", "training_config",
           "upload_weights"]
