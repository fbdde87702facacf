import json
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from protocols.bundle import (
    BUNDLE_VERSION, BundleFile, HeadSpec, InputSpec, Manifest, OutputSpec, RadarOutputSpec, RadarSpec,
)
from protocols.messages import FrameHeader, Result, Status
from protocols.one_class import fit_knn
from protocols.schemas import CONTRACTS, schema_text

DOCS = Path(__file__).resolve().parents[1] / "docs" / "schemas"


@pytest.mark.parametrize("name", CONTRACTS)
def test_published_json_schema_is_current(name):
    published = DOCS / f"{name}.schema.json"
    assert published.read_text() == schema_text(CONTRACTS[name]), (
        f"{published} is stale: run `python -m protocols.schemas docs/schemas`")


def test_station_messages_read_with_fields_a_later_station_adds_but_frame_headers_stay_strict():
    result = {"v": 1, "result_id": "r1", "camera_id": "cam0", "frame_id": "f1", "part_id": None,
              "verdict": "pass", "score": 0.1, "threshold": 0.5, "flags": [], "ts_capture_ns": 1,
              "ts_result_ns": 2, "latency_ms": {"queue": 0, "decode": 0, "infer": 0, "post": 0, "total": 0,
                                                "later": 1},
              "model": {"name": "m", "version": "1", "sha256": "ab", "later": "x"},
              "regions": [], "mask": None, "meta": None, "later": True}
    assert Result.model_validate_json(json.dumps(result)).model.name == "m"
    # a station older than `model.head` is read too
    del result["model"]["later"]
    assert Result.model_validate(result).model.head is None
    assert Status.model_validate({"v": 1, "state": "online", "station_id": "s", "ts_ns": 1, "later": 2}).state == "online"
    header = {"v": 1, "camera_id": "cam0", "frame_id": "f1", "ts_ns": 1, "encoding": "png", "width": 2, "height": 2}
    FrameHeader.model_validate(header)
    with pytest.raises(ValidationError, match="part_idd"):
        FrameHeader.model_validate({**header, "part_idd": "SN-1"})


def test_protocols_imports_neither_side_and_nothing_shipped_imports_the_harness():
    root = Path(__file__).resolve().parents[1]
    for package, forbidden in (("protocols", ("trainer", "edge", "harness")), ("edge", ("trainer", "harness")),
                               ("trainer", ("harness",))):
        for path in (root / package).rglob("*.py"):
            for line in path.read_text().splitlines():
                stripped = line.strip()
                assert not any(stripped.startswith((f"import {f}", f"from {f}")) for f in forbidden), (path, line)


DEMO_MANIFEST = Path(__file__).resolve().parents[1] / "demo" / "bundle" / "manifest.json"
FILE_FIELDS_V1 = ("path", "format", "target", "sha256")


def radar_head(norm_guided: HeadSpec) -> HeadSpec:
    one_class, _ = fit_knn(np.random.default_rng(0).uniform(1, 2, (8, 2)))
    return HeadSpec(name="radar", files=[BundleFile(path="radar.pt2", format="torch.export", target="cpu",
                                                    sha256="0" * 64)],
                    method=RadarSpec(t=50, discrepancy="residual", window=5, map_scale=2.0, blur_ksize=5,
                                     sobel_ksize=5, one_class=one_class),
                    thresholds=norm_guided.thresholds, metrics={"validation_selection": 0.5}, outputs=RadarOutputSpec())


@pytest.mark.parametrize("version", [1, 2])
def test_version_1_and_2_manifests_are_read_as_one_norm_guided_head(version):
    raw = json.loads(DEMO_MANIFEST.read_text())
    raw["version"] = version
    manifest = Manifest.model_validate(raw)
    assert manifest.version == BUNDLE_VERSION == 6 and manifest.head_names == ["norm-guided"]
    assert manifest.recommended_head == "norm-guided"
    head = manifest.head("norm-guided")
    assert [f.model_dump(include=set(FILE_FIELDS_V1)) for f in head.files] == raw["files"]
    assert all(f.precision == "fp32" and f.cpu_features == [] and f.parity is None for f in manifest.files)
    assert head.method.model_dump(exclude={"name"}) == {k: v for k, v in raw["method"].items() if k != "name"}
    assert head.thresholds.model_dump(exclude_none=True) == raw["thresholds"]
    assert head.metrics == raw["metrics"] and head.outputs == OutputSpec()
    assert Manifest.model_validate_json(manifest.model_dump_json()) == manifest


def test_a_version_3_manifest_round_trips_with_both_heads_and_checks_them():
    old = Manifest.model_validate_json(DEMO_MANIFEST.read_text())
    manifest = old.model_copy(update={"heads": [*old.heads, radar_head(old.heads[0])], "recommended_head": "radar"})
    text = manifest.model_dump_json()
    assert "files" not in json.loads(text) and Manifest.model_validate_json(text) == manifest
    assert [f.path for f in manifest.files] == ["model.pt2", "radar.pt2"]
    raw = json.loads(text)
    for broken, message in [
        ({**raw, "recommended_head": "radar", "heads": raw["heads"][:1]}, "recommended_head 'radar' is not one"),
        ({**raw, "heads": [raw["heads"][0], raw["heads"][0]]}, "heads listed twice"),
        ({**raw, "heads": [raw["heads"][0], {**raw["heads"][1], "files": raw["heads"][0]["files"]}]},
         "a file belongs to two heads"),
        ({**raw, "heads": [raw["heads"][0], {**raw["heads"][1], "name": "norm-guided"}]}, "must be those of"),
    ]:
        with pytest.raises(ValidationError, match=message):
            Manifest.model_validate(broken)


def test_version_3_to_5_manifests_read_as_version_6_lacking_only_fields_with_defaults():
    manifest = Manifest.model_validate_json(DEMO_MANIFEST.read_text())
    raw = json.loads(manifest.model_dump_json())
    del raw["input"]["tiling"]
    assert Manifest.model_validate({**raw, "version": 5}) == manifest
    for key in ("limited_by", "detection_ceiling_image", "detection_ceiling_pixel"):
        del raw["heads"][0]["thresholds"][key]
    assert Manifest.model_validate({**raw, "version": 4}) == manifest
    for entry in raw["heads"][0]["files"]:
        for key in ("precision", "cpu_features", "parity"):
            del entry[key]
    assert Manifest.model_validate({**raw, "version": 3}) == manifest


PARITY = {"images": 40, "verdict_agreement": 1.0, "max_abs_score_delta": 0.01, "image_auroc_delta": -0.2,
          "min_verdict_agreement": 0.995, "max_image_auroc_drop": 0.5}


@pytest.mark.parametrize("entry, message", [
    ({"precision": "int8"}, "int8 file needs parity figures"),
    ({"parity": PARITY}, "fp32 file has no parity figures"),
    ({"path": "../model.pt2"}, "should match pattern"),
    ({"path": "sub/model.pt2"}, "should match pattern"),
])
def test_a_file_entry_states_parity_exactly_below_fp32_and_is_a_plain_file_name(entry, message):
    valid = {"path": "model.ov.xml", "format": "openvino-ir", "target": "cpu", "sha256": "0" * 64}
    BundleFile.model_validate({**valid, "precision": "int8", "parity": PARITY, "cpu_features": ["avx2"]})
    with pytest.raises(ValidationError, match=message):
        BundleFile.model_validate({**valid, **entry})


def test_a_tiling_that_does_not_cover_the_input_is_refused_naming_both():
    tiling = {"tile": 64, "per_side": 2, "stride": 48}
    assert InputSpec(height=112, width=112, max_batch=4, tiling=tiling).tiling.per_side == 2
    with pytest.raises(ValidationError, match=r"tiling covers 112 px a side .* the input is 128 × 128"):
        InputSpec(height=128, width=128, max_batch=4, tiling=tiling)
