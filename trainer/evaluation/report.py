"""Pictures of an evaluation for a human: a grid of samples, the ROC / PR curves and the image
score histogram at the shipped threshold; and the verdict figures as one line of text."""

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from sklearn.metrics import precision_recall_curve, roc_curve  # noqa: E402

from trainer.evaluation.metrics import (image_ap, image_auroc, pixel_ap, pixel_auroc,  # noqa: E402
                                        subsample_indices)

DPI = 100
PLOTTED_PIXELS = 1_000_000  # a curve through more pixels looks the same and only slows plotting
COLUMNS = ("input", "norm-guided reconstruction", "norm-guided map", "RADAR map", "ground truth")
UNIT_SQUARE = {"xlim": (0, 1), "ylim": (0, 1.02), "aspect": "equal"}  # axes of a ROC or PR curve
HISTOGRAM_BINS = 30


def write_sample_grid(path: Path, images: np.ndarray, reconstructions: np.ndarray, maps: np.ndarray,
                      radar_maps: np.ndarray, masks: np.ndarray, titles: Sequence[str]) -> None:
    """One row per sample: input | reconstruction | norm-guided map | RADAR map (0..1 heat maps) |
    ground truth.

    images and reconstructions uint8 [N,H,W,3], maps and radar_maps float [N,H,W] in [0, 1], masks
    bool [N,H,W], titles [N] (e.g. file, defect and scores).
    """
    count = len(images)
    if count == 0:
        raise ValueError("no samples to draw")
    if not len(reconstructions) == len(maps) == len(radar_maps) == len(masks) == len(titles) == count:
        raise ValueError(f"need one reconstruction, map of each head, mask and title per image ({count} images)")
    fig = plt.figure(figsize=(2.4 * len(COLUMNS) + 1.2, 2.75 * count), dpi=DPI, layout="constrained")
    for index, row in enumerate(fig.subfigures(count, 1, squeeze=False)[:, 0]):
        row.suptitle(titles[index], fontsize=10)
        axes = row.subplots(1, len(COLUMNS))
        axes[0].imshow(images[index])
        axes[1].imshow(reconstructions[index])
        for ax, heat_map in ((axes[2], maps[index]), (axes[3], radar_maps[index])):
            heat = ax.imshow(heat_map, cmap="jet", vmin=0.0, vmax=1.0)
            row.colorbar(heat, ax=ax, fraction=0.046, pad=0.02)
        axes[4].imshow(masks[index], cmap="gray", vmin=0, vmax=1)
        for ax, name in zip(axes, COLUMNS):
            ax.set_title(name, fontsize=8)
            ax.set_axis_off()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def write_curves(out_dir: Path, labels: np.ndarray, scores: np.ndarray, masks: np.ndarray,
                 maps: np.ndarray) -> list[Path]:
    """Image ROC, image PR, pixel ROC and pixel PR curves as PNGs in out_dir; returns their paths.

    The legends give AUROC / AP over all pixels; pixel curves are drawn through a fixed subsample
    when there are more than PLOTTED_PIXELS. A level with only one class present has no curves.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    auroc = image_auroc(labels, scores)  # NaN when only one class is present
    if not np.isnan(auroc):
        written += _write_roc_and_pr(out_dir, "image", np.asarray(labels, bool), np.asarray(scores),
                                     auroc, image_ap(labels, scores))
    auroc = pixel_auroc(masks, maps)
    if not np.isnan(auroc):
        plotted = subsample_indices(np.size(maps), PLOTTED_PIXELS)
        written += _write_roc_and_pr(out_dir, "pixel", np.asarray(masks, bool).ravel()[plotted],
                                     np.asarray(maps).ravel()[plotted], auroc, pixel_ap(masks, maps))
    return written


def _write_roc_and_pr(out_dir: Path, level: str, labels: np.ndarray, scores: np.ndarray,
                      auroc: float, ap: float) -> list[Path]:
    false_positive_rate, true_positive_rate, _ = roc_curve(labels, scores)
    precision, recall, _ = precision_recall_curve(labels, scores)
    roc_path, pr_path = out_dir / f"{level}_roc.png", out_dir / f"{level}_pr.png"

    fig, ax = plt.subplots(figsize=(5, 5), dpi=DPI, layout="constrained")
    ax.plot(false_positive_rate, true_positive_rate, label=f"AUROC = {auroc:.4f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set(**UNIT_SQUARE)
    _finish(fig, ax, roc_path, f"{level} ROC", "false positive rate", "true positive rate", "lower right")

    fig, ax = plt.subplots(figsize=(5, 5), dpi=DPI, layout="constrained")
    ax.plot(recall, precision, drawstyle="steps-post", label=f"AP = {ap:.4f}")
    ax.axhline(labels.mean(), color="grey", linestyle=":", label="chance")
    ax.set(**UNIT_SQUARE)
    _finish(fig, ax, pr_path, f"{level} precision-recall", "recall", "precision", "lower left")
    return [roc_path, pr_path]


def _finish(fig: plt.Figure, ax: plt.Axes, path: Path, title: str, xlabel: str, ylabel: str,
            legend_corner: str) -> None:
    """Label, save and close a figure; the legend goes in the corner the plot leaves empty."""
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    ax.legend(loc=legend_corner)
    fig.savefig(path)
    plt.close(fig)


def write_score_histogram(path: Path, labels: np.ndarray, scores: np.ndarray, verdicts: dict) -> None:
    """Histograms of the image scores of good and of defective images on shared bins, the shipped
    threshold as a vertical line, the false reject and escape rates in the title.

    labels bool [N] (True = defective), scores [N], verdicts the `verdicts` block of metrics.json
    (image_threshold and verdict_metrics' figures at it).
    """
    labels, scores = np.asarray(labels, bool), np.asarray(scores)
    threshold = verdicts["image_threshold"]
    bins = np.histogram_bin_edges(scores, bins=HISTOGRAM_BINS)  # shared, so the bars compare
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=DPI, layout="constrained")
    for is_defective, name, colour in ((False, "good", "tab:green"), (True, "defective", "tab:red")):
        chosen = scores[labels == is_defective]
        ax.hist(chosen, bins=bins, color=colour, alpha=0.55, label=f"{name} ({len(chosen)})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"shipped threshold {threshold:.4g}")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))  # image counts
    path.parent.mkdir(parents=True, exist_ok=True)
    _finish(fig, ax, path, _rejects_and_escapes(verdicts["counts"]), "image score", "images", "best")


def verdict_line(verdicts: dict) -> str:
    """The verdict figures of metrics.json in one line, e.g. for the terminal."""
    stated = verdicts.get("stated_false_reject_rate")
    return (f"at the shipped threshold {verdicts['image_threshold']:.4g}"
            + ("" if stated is None else f" (stated false rejects {100 * stated:.1f} %)")
            + f": {_rejects_and_escapes(verdicts['counts'])}, precision {_figure(verdicts['precision'])}, "
            f"recall {_figure(verdicts['recall'])}, F1 {_figure(verdicts['f1'])}")


def _rejects_and_escapes(counts: dict) -> str:
    good, defective = counts["true_pass"] + counts["false_reject"], counts["escape"] + counts["true_fail"]
    return f"false rejects {_share(counts['false_reject'], good)}, escapes {_share(counts['escape'], defective)}"


def _share(part: int, whole: int) -> str:
    """'2/40 (5.0 %)'; a share of nothing has no percentage."""
    return f"{part}/{whole} ({100 * part / whole:.1f} %)" if whole else f"{part}/{whole}"


def _figure(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
