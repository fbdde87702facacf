"""The portable program: strict torch.export of the fused inference with a dynamic batch."""

import torch

from trainer.fused import FusedInference


def export_fused(fused: FusedInference, image_size: int, max_batch: int) -> torch.export.ExportedProgram:
    """uint8 [B, H, W, 3] with 1 <= B <= max_batch; strict, so any graph break is an error."""
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    # The example batch is 2: a batch of 1 would let tracing specialise the batch dimension.
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        return torch.export.export(fused.eval(), (example,), dynamic_shapes=({0: batch},), strict=True)
