"""Frames larger than the networks' input: a frame resized to `frame` px a side is cut into n × n
tiles of the profile's size that overlap by a quarter (stride ¾ tile), and per-tile maps are
stitched back as their mean where tiles overlap. Static slices and constant pads only, so every
export target takes the graph; one tile a side is no tiling at all."""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STRIDE_FRACTION = 0.75


def tile_stride(tile: int) -> int:
    return round(tile * STRIDE_FRACTION)


def frame_size(tile: int, per_side: int) -> int:
    """The frame side that n tiles a side cover exactly."""
    return tile + (per_side - 1) * tile_stride(tile)


def tile_origins(tile: int, per_side: int) -> list[tuple[int, int]]:
    """(row, column) of each tile's top-left pixel, row by row."""
    starts = [i * tile_stride(tile) for i in range(per_side)]
    return [(y, x) for y in starts for x in starts]


class Tiling(nn.Module):
    """split: frames [B, C, S, S] → tiles [T·B, C, t, t] (tile-major); stitch: the inverse for maps
    [T·B, ..., t, t] → [B, ..., S, S], overlaps averaged. With one tile a side both return their
    input: an untiled graph is unchanged."""

    def __init__(self, tile: int, per_side: int):
        super().__init__()
        self.tile, self.frame = tile, frame_size(tile, per_side)
        self.origins = tile_origins(tile, per_side)
        self.tiled = per_side > 1
        coverage = sum(self._placed(torch.ones(tile, tile), y, x) for y, x in self.origins)
        self.register_buffer("inverse_coverage", 1.0 / coverage if self.tiled else None)

    def _placed(self, tile: Tensor, y: int, x: int) -> Tensor:
        """A tile (last two dims) padded with zeros to the frame, at its origin."""
        return F.pad(tile, (x, self.frame - x - self.tile, y, self.frame - y - self.tile))

    def split(self, frames: Tensor) -> Tensor:
        if not self.tiled:
            return frames
        t = self.tile
        return torch.cat([frames[..., y:y + t, x:x + t] for y, x in self.origins])

    def stitch(self, tiles: Tensor) -> Tensor:
        if not self.tiled:
            return tiles
        per_tile = tiles.unflatten(0, (len(self.origins), -1))
        total = sum(self._placed(per_tile[i], y, x) for i, (y, x) in enumerate(self.origins))
        return total * self.inverse_coverage

    def map(self, per_tile: Callable[[Tensor], Tensor], frames: Tensor) -> Tensor:
        """`per_tile` over the frames' tiles, stitched back."""
        return self.stitch(per_tile(self.split(frames)))
