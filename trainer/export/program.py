"""The portable program: strict torch.export of a head's inference graph with a dynamic batch."""

import torch


def export_head(head: torch.nn.Module, image_size: int, max_batch: int) -> torch.export.ExportedProgram:
    """A head graph (FusedInference, RadarInference: uint8 [B, H, W, 3] → two outputs) for
    1 <= B <= max_batch; strict, so any graph break is an error."""
    batch = torch.export.Dim("batch", min=1, max=max(max_batch, 2))
    # The example batch is 2: a batch of 1 would let tracing specialise the batch dimension.
    example = torch.zeros((2, image_size, image_size, 3), dtype=torch.uint8)
    with torch.no_grad():
        return torch.export.export(head.eval(), (example,), dynamic_shapes=({0: batch},), strict=True)
