"""The demo's pictures: per verdict, the frame with the defect contours beside a heat map."""

import base64
from pathlib import Path

import cv2
import numpy as np

from edge.frames import to_model_input
from edge.postprocess import upscale_map
from harness import HarnessError
from harness.samples import Sample
from protocols.messages import Result

CONTOUR_BGR = (0, 0, 255)
CAPTION_HEIGHT_PX = 28


def write_overlays(samples: list[Sample], results: dict[int, Result], bundle: Path, out: Path) -> None:
    """One PNG per verdict (results by frame index) into `out`. The result carries the mask but
    not the anomaly map, so the bundle runs here once more, on the same model input the daemon made."""
    from edge.runtime.loader import load_model  # torch: imported only when the pictures are drawn

    model = load_model(bundle)
    spec = model.bundle.manifest.input
    indices = sorted(results)
    for start in range(0, len(indices), spec.max_batch):
        batch = indices[start:start + spec.max_batch]
        frames = [_read_bgr(samples[i].path) for i in batch]
        inputs = np.stack([to_model_input(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), spec.height, spec.width)
                           for f in frames])
        maps, _ = model.infer(inputs)
        for index, frame, anomaly_map in zip(batch, frames, maps):
            picture = overlay_picture(frame, results[index], anomaly_map, samples[index])
            cv2.imwrite(str(out / samples[index].overlay_name), picture)


def _read_bgr(path: Path) -> np.ndarray:
    image = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if image is None:
        raise HarnessError(f"not a readable image: {path}")
    return image


def overlay_picture(frame: np.ndarray, result: Result, anomaly_map: np.ndarray, sample: Sample) -> np.ndarray:
    """A caption over two panels: the frame with the mask's contours, and the heat map blended
    over the frame."""
    height, width = frame.shape[:2]
    contoured = frame.copy()
    if result.mask is not None:
        contours, _ = cv2.findContours(_decode_mask(result.mask), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(contoured, contours, -1, CONTOUR_BGR, thickness=2)
    # The map is in [0, 1] on an absolute scale: a good part stays cool rather than being stretched.
    levels = (upscale_map(anomaly_map, height, width) * 255).clip(0, 255).astype(np.uint8)
    heat = cv2.addWeighted(frame, 0.5, cv2.applyColorMap(levels, cv2.COLORMAP_JET), 0.5, 0)
    caption = np.zeros((CAPTION_HEIGHT_PX, 2 * width, 3), np.uint8)
    score = "n/a" if result.score is None else f"{result.score:.3f}"
    text = (f"{sample.name}  {result.verdict.upper()}  score {score} / {result.threshold:.3f}  "
            f"truth {sample.truth}  {'correct' if sample.judged_right(result) else 'WRONG'}")
    cv2.putText(caption, text, (8, CAPTION_HEIGHT_PX - 9), cv2.FONT_HERSHEY_SIMPLEX, 0.55, (255, 255, 255), 1,
                cv2.LINE_AA)
    return np.vstack([caption, np.hstack([contoured, heat])])


def _decode_mask(encoded: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_GRAYSCALE)
