"""From an anomaly map to what the plant sees: verdict, defect regions and the mask PNG, all at
the frame's resolution."""

import base64

import cv2
import numpy as np

from protocols.messages import Region


def upscale_map(anomaly_map: np.ndarray, height: int, width: int) -> np.ndarray:
    """Model-resolution map → frame resolution (bilinear)."""
    if anomaly_map.shape == (height, width):
        return anomaly_map
    return cv2.resize(anomaly_map, (width, height), interpolation=cv2.INTER_LINEAR)


def fail_region_threshold(pixel_threshold: float, image_threshold: float, frame_map: np.ndarray,
                          score_from_map: bool) -> float:
    """The map threshold that draws a failed part's regions: a fail always shows where.

    Norm-guided (`score_from_map`): the score is the mean of the map's highest pixels, so pixels at
    the image threshold exist whenever the part fails. RADAR: the score comes from the one-class
    model over features, on another scale than the map, so the pixel threshold applies, lowered to
    the map's peak when no pixel reaches it."""
    if score_from_map:
        return min(pixel_threshold, image_threshold)
    return min(pixel_threshold, float(frame_map.max()))


def find_regions(frame_map: np.ndarray, pixel_threshold: float, min_area_px: int) -> tuple[np.ndarray, list[Region]]:
    """Binary mask (map >= threshold) and its 8-connected regions, largest first."""
    mask = (frame_map >= pixel_threshold).astype(np.uint8)
    count, labels, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    regions = []
    for label in range(1, count):
        x, y, w, h, area = (int(v) for v in stats[label])
        if area < min_area_px:
            continue
        window = frame_map[y:y + h, x:x + w][labels[y:y + h, x:x + w] == label]
        regions.append(Region(bbox=(x, y, w, h), area_px=area, max_score=round(float(window.max()), 6)))
    regions.sort(key=lambda r: r.area_px, reverse=True)
    return mask, regions


def mask_png_base64(mask: np.ndarray) -> str:
    """Binary mask → base64 of a 1-channel PNG with 0/255 pixels."""
    ok, png = cv2.imencode(".png", mask * np.uint8(255))
    if not ok:
        raise RuntimeError("PNG encoding of the mask failed")
    return base64.b64encode(png.tobytes()).decode("ascii")
