"""TensorRT, checked statically on a CPU: every op of both heads' graphs (norm-guided, RADAR) has a
torch-tensorrt converter, and the GPU-only modules import and fail clearly without torch-tensorrt."""

import re
import subprocess
import sys

import pytest
import torch

from edge.runtime.tensorrt import TensorRTBackend
from trainer.export.program import export_head
from trainer.export.tensorrt import compile_tensorrt
from trainer.export.trt_readiness import _lowered_ops, tensorrt_ops, unsupported_ops, validated_ops
from trainer.method import MethodConfig
from trainer.model import DiffusionAD
from trainer.profiles import get_profile
from trainer.radar import RadarConstants, feature_window

PROFILE = get_profile("tiny")


def export_with_dynamic_batch(module: torch.nn.Module, example: torch.Tensor) -> torch.export.ExportedProgram:
    """Strict export with a dynamic batch of 1..8, as tests/test_fused.py exports the fused graph."""
    batch = torch.export.Dim("batch", min=1, max=8)
    with torch.no_grad():
        return torch.export.export(module, (example,), dynamic_shapes=({0: batch},), strict=True)


@pytest.fixture(scope="module", params=[(3, 1), (1, 1), (3, 2)], ids=["rgb", "gray", "rgb-tiled"])
def fused_program(request) -> torch.export.ExportedProgram:
    channels, tiles_per_side = request.param
    model = DiffusionAD(PROFILE, channels, tiles_per_side)
    size = model.frame_size
    return export_with_dynamic_batch(model.fused(MethodConfig()).eval(),
                                     torch.randint(0, 256, (2, size, size, 3), dtype=torch.uint8))


@pytest.fixture(scope="module", params=[1, 2], ids=["whole", "tiled"])
def radar_program(request) -> torch.export.ExportedProgram:
    model = DiffusionAD(PROFILE, tiles_per_side=request.param)
    head = model.radar(MethodConfig(), RadarConstants(
        t=50, discrepancy="residual", window=feature_window(model.image_size), map_scale=1.0))
    return export_head(head, model.frame_size, 8)


def test_the_op_list_names_the_torch_tensorrt_version_it_was_read_from():
    facts = tensorrt_ops()
    assert re.fullmatch(r"\d+\.\d+\.\d+\S*", facts["torch_tensorrt_version"])
    assert "aten::convolution.default" in facts["converters"]
    assert facts["decompositions"]["enabled"] and facts["decompositions"]["disabled"]


def test_every_op_of_the_fused_graph_has_a_tensorrt_converter(fused_program):
    assert unsupported_ops(fused_program) == []


def test_every_op_of_the_radar_graph_has_a_tensorrt_converter(radar_program):
    ops = {name for name, _ in _lowered_ops(radar_program)}
    # Its filters as TensorRT sees them: reflected borders, depthwise (grouped) convolutions, the
    # window pooling, the gradient magnitude and the largest window.
    assert {"aten::reflection_pad2d.default", "aten::convolution.default", "aten::avg_pool2d.default",
            "aten::sqrt.default", "aten::amax.default"} <= ops
    assert unsupported_ops(radar_program) == []
    # avg_pool_param_validator refuses ceil_mode and divisor_override; the head uses neither.
    pools = [n for n in radar_program.graph.nodes if n.target is torch.ops.aten.avg_pool2d.default]
    assert pools and all(n.args[4:] in ((), (False,), (False, True), (False, True, None)) for n in pools)


def test_ops_with_capability_limits_are_listed_for_review(fused_program):
    reviewed = validated_ops(fused_program)
    assert "aten::topk.default" in reviewed  # k must be a constant <= 3840
    assert set(reviewed) <= set(tensorrt_ops()["validated"])


class ErfinvThenLog1p(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.special.erfinv(x).log1p()


def test_ops_without_a_usable_converter_are_reported():
    facts = tensorrt_ops()
    # erfinv has no converter; log1p has one, but not for dynamic shapes.
    assert not any(name.startswith("aten::erfinv") for name in facts["converters"])
    assert "aten::log1p.default" in facts["static_shapes_only"]
    example = torch.rand(2, 4)
    assert unsupported_ops(export_with_dynamic_batch(ErfinvThenLog1p(), example)) == [
        "aten::erfinv.default", "aten::log1p.default"]
    assert unsupported_ops(torch.export.export(ErfinvThenLog1p(), (example,), strict=True)) == ["aten::erfinv.default"]


IMPORT_WITHOUT_TORCH_TENSORRT = """
import sys
sys.modules["torch_tensorrt"] = None  # from here on `import torch_tensorrt` raises ImportError
import edge.runtime.tensorrt
import trainer.export.tensorrt
"""


def test_the_tensorrt_modules_import_without_torch_tensorrt():
    subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_TORCH_TENSORRT], check=True)


def test_without_torch_tensorrt_the_backend_is_unavailable_and_compiling_says_what_to_do(
        monkeypatch, fused_program, tmp_path):
    monkeypatch.setitem(sys.modules, "torch_tensorrt", None)
    assert not TensorRTBackend.available()
    size = PROFILE.image_size
    with pytest.raises(RuntimeError, match=re.escape("pip install '.[tensorrt]' on the GPU machine")):
        compile_tensorrt(fused_program, size, size, 8, tmp_path / "model.trt.ep", "{}")
