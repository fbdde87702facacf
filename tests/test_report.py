import cv2
import numpy as np
import pytest

from trainer.evaluation import report
from trainer.evaluation.report import write_curves, write_sample_grid


def samples(count: int, size: int = 32):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, size, size, 3), dtype=np.uint8)
    masks = np.zeros((count, size, size), bool)
    masks[:, 8:16, 8:16] = True
    maps = rng.random((count, size, size))
    titles = [f"crack/{i:03d}.png  score {i / 10:.3f}" for i in range(count)]
    return images, images[:, ::-1], maps, masks, titles


def test_sample_grid_has_one_row_per_sample(tmp_path):
    write_sample_grid(tmp_path / "one.png", *samples(1))
    write_sample_grid(tmp_path / "three.png", *samples(3))
    one, three = cv2.imread(str(tmp_path / "one.png")), cv2.imread(str(tmp_path / "three.png"))
    assert one is not None and three is not None
    assert three.shape[1] == one.shape[1]
    assert abs(three.shape[0] / one.shape[0] - 3) < 0.1
    assert one.shape[1] > 3 * one.shape[0]  # four panels side by side in a row


def test_anomaly_maps_share_a_fixed_colour_scale(tmp_path):
    images, reconstructions, _, masks, _ = samples(2)
    # each map is constant, so a per-image colour scale would paint both alike
    maps = np.stack([np.full((32, 32), 0.0), np.full((32, 32), 1.0)])
    write_sample_grid(tmp_path / "grid.png", images, reconstructions, maps, masks, ["low", "high"])
    grid = cv2.imread(str(tmp_path / "grid.png"))
    height, width = grid.shape[:2]
    # the heat map is the third of four panels; sample its centre in each row (BGR)
    x = int(width * 0.6)
    low = grid[int(height * 0.3), x].astype(int)
    high = grid[int(height * 0.8), x].astype(int)
    assert low[0] > low[2] + 50  # blue: 0
    assert high[2] > high[0] + 50  # red: 1


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
