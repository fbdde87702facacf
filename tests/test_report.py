import cv2
import numpy as np
import pytest

from trainer.evaluation import report
from trainer.evaluation.metrics import verdict_metrics
from trainer.evaluation.report import verdict_line, write_curves, write_sample_grid, write_score_histogram


def samples(count: int, size: int = 32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), bool)
    masks[:, 8:16, 8:16] = True
    maps, radar_maps = rng.random((count, size, size)), rng.random((count, size, size))
    titles = [f"crack/{i:03d}.png  score {i / 10:.3f}" for i in range(count)]
    return images, images[:, ::-1], maps, radar_maps, masks, titles


def test_sample_grid_has_one_row_per_sample(tmp_path):
    write_sample_grid(tmp_path / "one.png", *samples(1))
    write_sample_grid(tmp_path / "three.png", *samples(3))
    one, three = cv2.imread(str(tmp_path / "one.png")), cv2.imread(str(tmp_path / "three.png"))
    assert one is not None and three is not None
    assert three.shape[1] == one.shape[1]
    assert abs(three.shape[0] / one.shape[0] - 3) < 0.1
    assert one.shape[1] > 4 * one.shape[0]  # five panels side by side in a row


def test_anomaly_maps_of_both_heads_share_a_fixed_colour_scale(tmp_path):
    images, reconstructions, _, _, masks, _ = samples(2)
    # each map is constant, so a per-image colour scale would paint both rows alike
    maps = np.stack([np.full((32, 32), 0.0), np.full((32, 32), 1.0)])
    write_sample_grid(tmp_path / "grid.png", images, reconstructions, maps, maps, masks, ["low", "high"])
    grid = cv2.imread(str(tmp_path / "grid.png")).astype(int)  # BGR
    rows = grid[: len(grid) // 2], grid[len(grid) // 2:]

    def jet_pixels(row: np.ndarray, channel: int) -> int:
        """Pixels of the jet colour map's dark end: only `channel` (0 blue at 0, 2 red at 1) lit."""
        others = [c for c in range(3) if c != channel]
        return int(((row[..., channel] > 100) & (row[..., others] < 40).all(axis=-1)).sum())

    low, high = rows
    assert jet_pixels(low, 0) > 10 * max(1, jet_pixels(high, 0))  # both heat maps blue where 0
    assert jet_pixels(high, 2) > 10 * max(1, jet_pixels(low, 2))  # and red where 1


def test_curves_are_written_at_both_levels(tmp_path, monkeypatch):
    monkeypatch.setattr(report, "PLOTTED_PIXELS", 500)  # exercise the subsampled pixel curves
    rng = np.random.default_rng(0)
    labels = np.r_[np.zeros(10, bool), np.ones(10, bool)]
    scores = rng.random(20) + labels
    masks = np.zeros((20, 16, 16), bool)
    masks[10:, 4:8, 4:8] = True
    maps = rng.random(masks.shape) + masks
    paths = write_curves(tmp_path / "curves", labels, scores, masks, maps)
    assert [p.name for p in paths] == ["image_roc.png", "image_pr.png", "pixel_roc.png", "pixel_pr.png"]
    for path in paths:
        picture = cv2.imread(str(path))
        assert picture is not None and picture.shape[0] >= 300


@pytest.mark.parametrize("defective", [False, True])
def test_curves_need_both_classes(tmp_path, defective):
    labels = np.full(3, defective)
    masks = np.full((3, 8, 8), not defective)
    assert write_curves(tmp_path, labels, np.arange(3.0), masks, np.zeros((3, 8, 8))) == []


def verdicts_at(threshold: float, labels: np.ndarray, scores: np.ndarray) -> dict:
    defects = ["crack" if label else "good" for label in labels]
    return {"image_threshold": threshold, **verdict_metrics(labels, scores >= threshold, defects)}


def test_score_histogram_shows_both_classes_on_shared_bins_the_threshold_and_the_rates(tmp_path, monkeypatch):
    labels = np.r_[np.zeros(10, bool), np.ones(10, bool)]
    scores = np.r_[np.linspace(0.1, 0.5, 10), np.linspace(0.3, 0.9, 10)]  # 1 good above 0.47, 3 defective below
    closed = []  # keep the figure open to read what was drawn
    monkeypatch.setattr(report.plt, "close", closed.append)
    write_score_histogram(tmp_path / "histogram.png", labels, scores, verdicts_at(0.47, labels, scores))
    (fig,) = closed
    ax = fig.axes[0]
    assert ax.get_title() == "false rejects 1/10 (10.0 %), escapes 3/10 (30.0 %)"
    (line,) = ax.lines
    assert list(line.get_xdata()) == [0.47, 0.47]
    assert "shipped threshold 0.47" in [text.get_text() for text in ax.get_legend().get_texts()]
    good, defective = ax.containers
    assert sum(bar.get_height() for bar in good) == 10 and sum(bar.get_height() for bar in defective) == 10
    assert [bar.get_x() for bar in good] == [bar.get_x() for bar in defective]  # shared bins
    assert good[0].get_facecolor() != defective[0].get_facecolor()
    report.plt.close(fig)
    picture = cv2.imread(str(tmp_path / "histogram.png"))
    assert picture is not None and picture.shape[0] >= 300


def test_verdict_line_counts_and_rates():
    labels = np.array([False] * 4 + [True] * 5)
    scores = np.array([0.1, 0.7, 0.2, 0.3, 0.8, 0.9, 0.2, 0.6, 0.4])
    assert verdict_line(verdicts_at(0.5, labels, scores)) == (
        "at the shipped threshold 0.5: false rejects 1/4 (25.0 %), escapes 2/5 (40.0 %), "
        "precision 0.750, recall 0.600, F1 0.667")
    # nothing defective and nothing failed: no escape share, and the fail verdict's figures are undefined
    assert verdict_line(verdicts_at(0.95, labels[:4], scores[:4])) == (
        "at the shipped threshold 0.95: false rejects 0/4 (0.0 %), escapes 0/0, "
        "precision n/a, recall n/a, F1 n/a")
