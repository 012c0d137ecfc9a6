"""Every data-pipeline setting, with its default (the official DeepViT / DeiT recipe).

The defaults reproduce the training recipe of the released models (the official yaml files):
random-resized crop (0.08-1, 3/4-4/3, random bilinear/bicubic), flip 0.5, RandAugment
``rand-m9-mstd0.5-inc1``, random erasing 0.25 (pixel mode), mixup 0.8 / cutmix 1.0 switched
per batch with probability 0.5, label smoothing 0.1.  The dataset defaults to the embedded
scikit-learn ``digits`` set; recipes for other datasets override fields.
"""

from __future__ import annotations

import ml_collections


def default_data_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    # --- source -------------------------------------------------------------------------
    # 'digits' (embedded scikit-learn digits, prepared on first use), 'imagenet2012',
    # any TFDS image-classification name (e.g. 'cifar10', 'imagenette/320px'), or 'folder'
    # (a local folder of images in <split>/<class>/ sub-folders, see `folder_path`).
    c.dataset = "digits"
    c.data_dir = None          # TFDS data_dir; None -> $TFDS_DATA_DIR or ~/tensorflow_datasets
    c.folder_path = None       # only for dataset='folder': root with <split>/<class>/*.jpg
    c.train_split = "train"
    c.eval_split = None        # None -> 'validation' if the dataset has it, else 'test'
    c.image_key = "image"
    c.label_key = "label"
    # --- reading ------------------------------------------------------------------------
    # 'tfrecord': tf.data over the TFRecord files (every process reads the whole split in
    # the global order). 'array_record': random access to the ArrayRecord files (added by
    # `python -m deepvit_jax.data prepare NAME --array-record`; needs the `grain` extra):
    # each process reads only its B/P records per step, in the same global order rule, so
    # the batches still do not depend on the process count (data/index.py). 'auto':
    # array_record where the prepared dataset has ArrayRecord files, else tfrecord (a
    # resumed run keeps the reader it started with).
    c.reader = "auto"
    c.num_workers = -1         # ArrayRecord reader: grain worker processes (-1 = one per
                               # core, at most half the available memory at ~1.2 GB each)
    c.shuffle_buffer = 16_384  # examples (encoded bytes) in the host shuffle buffer
    c.num_parallel_calls = -1  # decode/augment threads; -1 = tf.data.AUTOTUNE
    c.prefetch_batches = 2     # batches prefetched on host (tf.data) and on device
    c.cache = False            # cache the encoded split in memory (small datasets)
    c.private_threadpool_size = 0  # 0 = tf.data default
    # True: every process reads the whole split in one global shuffled order and keeps its
    # slice of each global batch, so the batches (and the loss curve) do not depend on the
    # process count and a run may resume on another number of hosts. False: each process
    # reads only its 1/P of the split (P times less read I/O per host, for pod-scale runs
    # where reading the encoded split is the bottleneck; batches then depend on P).
    c.global_order = True
    # --- training augmentation (host side, tf.data) --------------------------------------
    c.random_resized_crop = True
    c.rrc_scale = (0.08, 1.0)
    c.rrc_ratio = (3.0 / 4.0, 4.0 / 3.0)
    c.train_interpolation = "random"   # 'random' (bilinear|bicubic, as timm), 'bicubic', 'bilinear'
    c.hflip = 0.5                       # probability; 0 disables
    c.randaugment = "rand-m9-mstd0.5-inc1"   # timm spec string; '' or None disables
    c.random_erasing = 0.25             # probability; 0 disables
    c.erasing_mode = "pixel"            # 'pixel' (per-pixel N(0,1)) | 'rand' | 'const'
    c.erasing_count = 1
    # True: the host stops after crop + resize + flip and yields uint8 (B, S, S, 3) batches;
    # RandAugment, normalisation and random erasing run in the jitted train step
    # (data/device_augment.py, same ops, magnitudes and probabilities).
    c.device_augment = False
    return c


def default_mix_config() -> ml_collections.ConfigDict:
    """On-device batch mixing (``mix.mix_batch``, called by the train step): timm's Mixup
    in 'batch' mode with the official values."""
    c = ml_collections.ConfigDict()
    c.mixup_alpha = 0.8
    c.cutmix_alpha = 1.0
    c.switch_prob = 0.5  # CutMix instead of mixup when both alphas are > 0
    c.prob = 1.0  # probability of mixing a batch at all
    c.label_smoothing = 0.1
    return c


def digits_data_config() -> ml_collections.ConfigDict:
    """Settings that suit the 8x8 digits (no flips / RandAugment, which destroy digits; the
    default config also turns mixup / cutmix off)."""
    c = default_data_config()
    c.dataset = "digits"
    c.rrc_scale = (0.6, 1.0)
    c.hflip = 0.0
    c.randaugment = ""
    c.random_erasing = 0.0
    c.shuffle_buffer = 2048
    c.cache = True
    return c
