"""What the notebooks show: predictions on images, figures inline, the collapse analysis of
checkpoints."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

from deepvit_jax import analysis, predict
from deepvit_jax.analysis import sweep, sweep_report
from deepvit_jax.colab.runtime import say
from deepvit_jax.utils import atomic_output


def sample_image(path: str = "cat.png") -> str:
    """scikit-image's sample photo of a cat (``skimage.data.chelsea``) saved as ``path``."""
    from PIL import Image  # the extras of the notebooks
    from skimage import data

    with atomic_output(path) as tmp:
        Image.fromarray(data.chelsea()).save(tmp, format="PNG")
    return path


def classify(model, images: Sequence[str], k: int = 5, names_file: str | None = None
             ) -> list[list[tuple[int, float, str]]]:
    """Top-``k`` (class index, probability, name) of each image file, printed as
    ``python -m deepvit_jax.predict`` prints them (the same preprocessing and names)."""
    cfg = model.config
    names = predict.class_names(cfg.num_classes, names_file)
    batch, labels = predict.load_inputs(list(images), cfg)
    idx, prob = predict.top_k(predict.predict_logits(model, batch), min(k, cfg.num_classes))
    rows = []
    for label, ii, pp in zip(labels, idx, prob, strict=True):
        say(f"{label}:")
        rows.append([(int(i), float(q), names[i]) for i, q in zip(ii, pp, strict=True)])
        for rank, (i, q, name) in enumerate(rows[-1], 1):
            say(f"  {rank}. {q:6.2%}  {name}  [{i}]")
    return rows



def show(fig, dpi: int = 100) -> None:
    """Display a matplotlib figure inline as a PNG, whatever backend is active (the analysis
    plots draw with Agg), then close it."""
    import io

    import matplotlib.pyplot as plt
    from IPython.display import Image, display

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    display(Image(data=buf.getvalue()))


@dataclasses.dataclass
class Analysed:
    """One checkpoint's collapse measures (``deepvit_jax.analysis.analyse_checkpoint``), with
    the model and the images they were measured on (for the attention maps)."""

    result: dict
    model: Any
    images: Any


def analyse_checkpoints(paths: Mapping[str, str], *, num_images: int = 64, k: int = 1,
                        threshold: float = 0.9, dataset: str = "") -> dict[str, Analysed]:
    """``analyse_checkpoint`` of each labelled path (model directory, training workdir or
    checkpoint), one line each: depth, similar blocks, mean similarity to the next block."""
    out = {}
    for label, path in paths.items():
        result, model, images = analysis.analyse_checkpoint(
            path, num_images=num_images, k=k, threshold=threshold, dataset=dataset or None,
            return_model=True)
        out[label] = Analysed(result, model, images)
        to_next = result["to_next"]
        say(f"{label}: {result['depth']} blocks, {result['similar_blocks']} similar "
            f"(similarity to the next {k} >= {threshold}), mean {sum(to_next) / len(to_next):.3f}"
            f", last block pair {to_next[-1]:.3f}; {result['num_images']} images of "
            f"{result['dataset']} ({path})")
    return out


def show_similarity(analysed: Mapping[str, Analysed]) -> None:
    """Every checkpoint on one figure (``analysis.plot_similarity``), inline."""
    show(analysis.plot_similarity({label: a.result for label, a in analysed.items()}))


def show_attention(analysed: Mapping[str, Analysed], blocks: Sequence[int], index: int = 0
                   ) -> None:
    """The class token's attention of ``blocks`` over image ``index``, one figure per
    checkpoint (``analysis.plot_attention``), inline."""
    for label, a in analysed.items():
        maps = analysis.collect_maps(a.model, a.images[index:index + 1])
        cfg = a.model.config
        show(analysis.plot_attention(a.images[index:index + 1], maps, blocks, mean=cfg.mean,
                                     std=cfg.std, title=label))


def show_image_attention(model, image: str, blocks: Sequence[int]) -> None:
    """The class token's attention of ``blocks`` over one image file (its evaluation
    preprocessing), inline: head-averaged and per head."""
    batch, _ = predict.load_inputs([image], model.config)
    maps = analysis.collect_maps(model, batch)
    show(analysis.plot_attention(batch, maps, blocks, mean=model.config.mean,
                                 std=model.config.std, title=os.path.basename(image)))


def run_sweep(out: str, settings: Mapping[str, Any] | None = None) -> dict:
    """The collapse study (``python -m deepvit_jax.analysis sweep``) into ``out`` with
    ``settings`` (``analysis.sweep.Settings`` fields; lists are fine; ``{}`` = the full
    default study), then its tables and figures inline. Finished runs in ``out`` are read
    back, not trained again (a new runtime goes on where the last one stopped)."""
    from IPython.display import Image, Markdown, display

    fields = {k: tuple(v) if isinstance(v, (list, tuple)) else v
              for k, v in (settings or {}).items()}
    s = sweep.Settings(**fields)
    sweep.enable_compilation_cache(out)
    report = sweep.sweep(s, out, log=say)
    display(Markdown(sweep_report.markdown_tables(report)))
    for name in ("depth.png", "adjacent.png", "histogram.png", "width.png"):
        if os.path.exists(os.path.join(out, name)):
            display(Image(filename=os.path.join(out, name)))
    return report
