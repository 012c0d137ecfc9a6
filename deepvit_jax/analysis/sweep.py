"""The attention-collapse study: ViT and DeepViT trained at several depths and seeds (and a
width sweep of the plain ViT), every run analysed by every like-for-like measure, one report.

  python -m deepvit_jax.analysis sweep --out runs/collapse_sweep
  python -m deepvit_jax.analysis sweep --out DIR --depths 8,16,24,32,48,64 --seeds 0,1,2 \\
      --widths 16,32,64 --steps 400

Every run goes through the project's own training loop (``train.loop.train_and_evaluate``
with the config of :func:`run_config`) in ``OUT/runs/<name>`` and is then analysed
(:func:`~deepvit_jax.analysis.measures.analyse_collapse` over the first ``--num-images``
test images) into ``OUT/runs/<name>/result.json``. A run with a result is never redone: the
same command after an interruption (Ctrl-C saves a checkpoint) goes on where it stopped, and
a run stopped mid-training resumes from its checkpoint. The report, ``OUT/report.json``,
``OUT/report.md`` (its tables) and ``OUT/*.png`` (:mod:`~deepvit_jax.analysis.sweep_report`),
is rebuilt from every result at the end (``--report-only``: from those there are, training nothing).

The data are the embedded scikit-learn digits (offline; 1437 train / 360 test, 10 classes)
upscaled to ``--image-size`` px and cut into ``--patch-size`` patches. The command line
turns on JAX's persistent compilation cache (``OUT/jax_cache`` unless
``JAX_COMPILATION_CACHE_DIR`` names another): runs that differ only by seed share one
compilation. The default settings have not been timed end to end yet.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

import jax

from deepvit_jax import cli, saved_run, utils
from deepvit_jax.analysis import similarity as sim
from deepvit_jax.analysis import sweep_report
from deepvit_jax.analysis.checkpoint_analysis import load_images
from deepvit_jax.analysis.measures import analyse_collapse
from deepvit_jax.data.config import digits_data_config
from deepvit_jax.errors import ConfigError
from deepvit_jax.train import config as config_lib
from deepvit_jax.train.loop import train_and_evaluate

MODELS = sweep_report.MODELS  # model -> variant: Re-attention in none / every block


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a sweep trains and measures. An accelerator takes wider models, bigger images
    and longer training through the same fields."""

    depths: tuple[int, ...] = (8, 16, 24, 32, 48, 64)
    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 32  # embedding width of the depth sweep
    widths: tuple[int, ...] = (16, 32, 64)  # plain-ViT width sweep (() = none) ...
    width_depth: int = 24  # ... at this depth
    num_heads: int = 4
    steps: int = 300
    batch_size: int = 64
    learning_rate: float = 2e-3
    warmup_fraction: float = 0.1
    image_size: int = 16
    patch_size: int = 4
    num_images: int = 64  # test images every measure averages over
    threshold: float = sim.DEFAULT_THRESHOLD
    data_dir: str = ""  # TFDS data dir of the digits ('' = TFDS's default)

    def check(self) -> None:
        """A ConfigError naming the flag for settings no run can take."""
        for name in ("depths", "seeds"):
            if not getattr(self, name):
                raise ConfigError(f"--{name}: give at least one")
        if min(self.depths) < 2 or (self.widths and self.width_depth < 2):
            raise ConfigError("--depths / --width-depth: need at least 2 blocks (adjacent "
                              "blocks are compared)")
        for name in ("steps", "batch_size", "num_images", "num_heads", "width"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} {getattr(self, name)}: "
                                  "must be >= 1")
        for w in (self.width, *self.widths):
            if w < 1 or w % self.num_heads:
                raise ConfigError(f"width {w}: must be a positive multiple of --heads "
                                  f"{self.num_heads}")
        if self.patch_size < 1 or self.image_size % self.patch_size:
            raise ConfigError(f"--image-size {self.image_size} is not a multiple of "
                              f"--patch-size {self.patch_size}")
        if not 0 <= self.warmup_fraction < 1:
            raise ConfigError(f"warmup_fraction={self.warmup_fraction}: must be in [0, 1)")


@dataclasses.dataclass(frozen=True)
class RunSpec:
    model: str  # 'vit' | 'deepvit'
    depth: int
    width: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.model}_d{self.depth}_w{self.width}_s{self.seed}"


def run_specs(s: Settings) -> list[RunSpec]:
    """Every run once, the runs of one (model, depth, width) next to each other (they share
    a compilation), shallow first; the width sweep's runs after the depth sweep's."""
    specs = [RunSpec(m, d, s.width, seed) for d in s.depths for m in MODELS for seed in s.seeds]
    specs += [RunSpec("vit", s.width_depth, w, seed) for w in s.widths for seed in s.seeds]
    return list(dict.fromkeys(specs))


def run_config(s: Settings, r: RunSpec):
    """The training config of one run: the default recipe (AdamW, warm-up + cosine) on the
    digits without mixup / cutmix / RandAugment and without EMA (the analysis looks at the
    trained weights), evaluated and checkpointed once, at the end."""
    c = config_lib.base_config(MODELS[r.model])
    c.data.update(digits_data_config())
    if s.data_dir:
        c.data.data_dir = s.data_dir
    c.mix.mixup_alpha = c.mix.cutmix_alpha = 0.0
    c.model.update(dict(image_size=s.image_size, patch_size=s.patch_size, embed_dim=r.width,
                        depth=r.depth, num_heads=s.num_heads, crop_pct=1.0))
    c.batch_size = s.batch_size
    c.total_steps = s.steps  # the schedule (num_epochs + warm-up) compressed to fit
    c.num_epochs = 100
    c.warmup_epochs = round(100 * s.warmup_fraction)
    c.cooldown_epochs = 0
    c.optim.learning_rate = s.learning_rate
    c.optim.min_lr = s.learning_rate / 100
    c.ema_decay = 0.0
    c.eval.bn_recalibration_batches = 0
    c.log_every_steps = max(s.steps // 10, 1)
    c.eval.every_steps = s.steps
    c.checkpoint.every_steps = s.steps
    c.checkpoint.keep = 1
    c.seed = r.seed
    return config_lib.lock(c)


def enable_compilation_cache(out: str) -> None:
    """JAX's persistent compilation cache in ``OUT/jax_cache`` unless one is set."""
    if os.environ.get("JAX_COMPILATION_CACHE_DIR") or jax.config.jax_compilation_cache_dir:
        return
    jax.config.update("jax_compilation_cache_dir", os.path.join(out, "jax_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def last_eval(workdir: str, step: int) -> dict | None:
    """The evaluation metrics the run logged at ``step`` (None if it did not get there)."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return None
    found = None
    with open(path) as f:
        for line in f:
            row = json.loads(line)
            if row.get("step") == step and "eval/top1" in row:
                found = row
    return found


def _train(config, workdir: str) -> None:
    train_and_evaluate(config, workdir)


def _analyse(s: Settings, workdir: str) -> dict:
    loaded = saved_run.load_checkpoint(workdir)
    config = saved_run.eval_config(loaded)
    images, _ = load_images(config.data, loaded.model_cfg, s.num_images)
    return analyse_collapse(loaded.model(), images, threshold=s.threshold)


class Interrupted(Exception):
    """A run stopped before its last step (a signal; its checkpoint is saved)."""


def _finished(path: str, want: dict, s: Settings) -> dict | None:
    """The run's result if ``path`` holds one for these settings; a ConfigError if it was
    trained with others."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        done = json.load(f)
    if done.get("config") != want:
        raise ConfigError(f"{path} was made with other settings than this sweep's: use "
                          "another --out, or the settings of that sweep (its settings.json)")
    if done.get("num_images") == s.num_images and done.get("threshold") == s.threshold:
        return done
    return None  # only the analysis settings changed: re-analyse the trained weights


def run_one(s: Settings, r: RunSpec, out: str) -> dict:
    """Train (or resume) and analyse one run; its result (also ``result.json``). A run
    whose ``result.json`` exists is read back, never redone."""
    workdir = os.path.join(out, "runs", r.name)
    path = os.path.join(workdir, "result.json")
    config = run_config(s, r)
    want = json.loads(config.to_json_best_effort())
    done = _finished(path, want, s)
    if done is not None:
        return done
    t = time.perf_counter()
    if last_eval(workdir, s.steps) is None:
        _train(config, workdir)
    metrics = last_eval(workdir, s.steps)
    if metrics is None:
        raise Interrupted(f"{r.name} stopped before step {s.steps}")
    result = {"run": dataclasses.asdict(r), "name": r.name,
              "top1": float(metrics["eval/top1"]), "eval_loss": float(metrics["eval/loss"]),
              "seconds": round(time.perf_counter() - t, 1), "config": want,
              **_analyse(s, workdir)}
    cli.write_json(path, result)
    return result


def _read_results(s: Settings, out: str) -> dict[str, dict]:
    results = {}
    for r in run_specs(s):
        path = os.path.join(out, "runs", r.name, "result.json")
        if os.path.exists(path):
            with open(path) as f:
                results[r.name] = json.load(f)
    if not results:
        raise ConfigError(f"--report-only: no finished run under {out}/runs")
    return results


def sweep(s: Settings, out: str, *, report_only: bool = False, log=print) -> dict:
    """Every run of ``s`` not finished yet, then the report (``OUT/report.json`` and
    figures); returns the report."""
    s.check()
    out = os.path.abspath(out)
    os.makedirs(os.path.join(out, "runs"), exist_ok=True)
    if report_only:
        results = _read_results(s, out)
    else:
        cli.write_json(os.path.join(out, "settings.json"), dataclasses.asdict(s))
        specs, results = run_specs(s), {}
        start = time.perf_counter()
        for i, r in enumerate(specs):
            res = results[r.name] = run_one(s, r, out)
            log(f"[{i + 1}/{len(specs)}] {r.name}: top-1 {res['top1']:.1f}%, similar blocks: "
                f"Eq. 2 {res['weights/eq2']['similar_blocks']}/{r.depth - 1}, softmax "
                f"{res['softmax/eq2']['similar_blocks']}, |cos| "
                f"{res['weights/abs']['similar_blocks']}, CKA {res['cka']['similar_blocks']}"
                f"  ({(time.perf_counter() - start) / 60:.1f} min)")
    report = sweep_report.make_report(dataclasses.asdict(s), results)
    cli.write_json(os.path.join(out, "report.json"), report)
    with utils.atomic_output(os.path.join(out, "report.md")) as tmp, open(tmp, "w") as f:
        f.write(sweep_report.markdown_tables(report))
    sweep_report.plot_all(report, out)
    return report


def _parser():
    d = Settings()
    p = cli.parser("deepvit_jax.analysis sweep", "Train ViT and DeepViT at several depths "
                   "and seeds (and a ViT width sweep), measure attention collapse in every "
                   "run, write one report.", __doc__)
    p.add_argument("--out", required=True, help="sweep directory (runs, report, figures)")
    p.add_argument("--depths", type=cli.int_list, default=d.depths)
    p.add_argument("--seeds", type=cli.int_list, default=d.seeds)
    p.add_argument("--width", type=int, default=d.width, help="width of the depth sweep")
    p.add_argument("--widths", type=cli.int_list, default=d.widths,
                   help="plain-ViT width sweep ('' = none)")
    p.add_argument("--width-depth", type=int, default=d.width_depth)
    p.add_argument("--heads", type=int, default=d.num_heads)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.learning_rate)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--patch-size", type=int, default=d.patch_size)
    p.add_argument("--num-images", type=int, default=d.num_images)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--data-dir", default="", help="TFDS data dir of the digits")
    p.add_argument("--report-only", action="store_true",
                   help="rebuild the report from the finished runs; train nothing")
    return p


def main(argv: list[str] | None = None) -> int:
    a = _parser().parse_args(argv)
    cli.setup_console(a.verbose, library_warnings=False)
    s = Settings(depths=tuple(a.depths), seeds=tuple(a.seeds), width=a.width,
                 widths=tuple(a.widths), width_depth=a.width_depth, num_heads=a.heads,
                 steps=a.steps, batch_size=a.batch_size, learning_rate=a.lr,
                 image_size=a.image_size, patch_size=a.patch_size, num_images=a.num_images,
                 threshold=a.threshold, data_dir=a.data_dir)

    def body():
        if not a.report_only:
            enable_compilation_cache(os.path.abspath(a.out))
        try:
            sweep(s, a.out, report_only=a.report_only, log=lambda m: print(m, flush=True))
        except Interrupted as e:
            print(f"{e}: its checkpoint is saved; run the same command to go on",
                  file=sys.stderr)
            return
        print(f"wrote {os.path.abspath(a.out)}/report.json, report.md (the tables) and the "
              "figures")

    return cli.run_cli(body, input_errors=(ValueError,))
