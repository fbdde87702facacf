"""`trainer export` → bundle → edge runtime: heads, parity on real images, and tampering refused."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hazelnut_images

from edge.runtime.aoti import AotiCpuBackend
from edge.runtime.bundle import BundleError
from edge.runtime.exported import ExportedCpuBackend
from edge.runtime.loader import batch_sizes, load_model
from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, ThresholdSpec, sha256_file
from trainer.cli import main
from trainer.evaluate import load_run
from trainer.export.aoti import X86_64_V3_FEATURES

DEMO_BUNDLE = Path(__file__).resolve().parents[1] / "demo" / "bundle"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(cpu_bundle) -> Path:
    return cpu_bundle[0]


@pytest.fixture(scope="module")
def eager_reference(tiny_run: Path, datasets_dir: Path):
    cfg, model, _ = load_run(tiny_run)
    images = hazelnut_images(datasets_dir, model.image_size, count=4)
    with torch.no_grad():
        maps, scores = model.fused(cfg.method).eval()(torch.from_numpy(images))
    return images, maps.numpy(), scores.numpy()


def test_manifest_describes_the_bundle(bundle: Path, tiny_run: Path):
    manifest = Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text())
    thresholds = json.loads((tiny_run / "thresholds.json").read_text())
    assert manifest.version == 6 and manifest.head_names == ["norm-guided", "radar"]
    head = manifest.head("norm-guided")
    assert manifest.input.height == manifest.input.width == 64 and manifest.input.max_batch == 4
    assert (head.method.t_s, head.method.t_b, head.method.top_k) == (200, 400, 50)
    assert head.thresholds.image == thresholds["false_reject_rate"]["image"]
    assert [(f.path, f.format) for f in head.files][:4] == [
        ("model.pt2", "torch.export"), ("model.cpu.pt2", "aoti-package"), ("model.ov.xml", "openvino-ir"),
        ("model.ov.bin", "openvino-weights")]  # then INT8 and bf16 IR within parity (tests/test_openvino.py)
    assert [f.cpu_features for f in head.files][:2] == [[], list(X86_64_V3_FEATURES)]
    assert len(manifest.provenance.data_fingerprint) == 64
    assert "validation_image_auroc" in head.metrics
    assert not list(bundle.parent.glob(".*partial")), "staging directory left behind"


def backends_here(bundle: Path):
    """Every backend that runs on this machine, each on its file."""
    manifest = Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text())
    entries = {f.path: f for f in manifest.files}
    for backend, name in ((ExportedCpuBackend, "model.pt2"), (AotiCpuBackend, "model.cpu.pt2")):
        yield backend(bundle / name, entries[name], manifest)


def test_every_backend_matches_eager_with_identical_verdicts(bundle, eager_reference):
    images, ref_maps, ref_scores = eager_reference
    threshold = Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text()).head("norm-guided").thresholds.image
    checked = []
    for backend in backends_here(bundle):
        for batch in (images[:1], images):
            maps, scores = backend.infer(batch)
            n = len(batch)
            np.testing.assert_allclose(maps, ref_maps[:n], rtol=0, atol=1e-4, err_msg=backend.key)
            np.testing.assert_allclose(scores, ref_scores[:n], rtol=0, atol=1e-4, err_msg=backend.key)
            assert np.array_equal(scores >= threshold, ref_scores[:n] >= threshold), backend.key
        checked.append(backend.key)
    assert checked == ["exported-cpu", "aoti-cpu"]


def test_auto_picks_a_warmed_up_backend(bundle, eager_reference):
    model = load_model(bundle, "auto", head="norm-guided")
    assert model.backend.key in ("exported-cpu", "aoti-cpu", "openvino-cpu") and model.images_per_second > 0
    assert list(model.batch_rates) == batch_sizes(4) and all(rate > 0 for rate in model.batch_rates.values())
    assert model.images_per_second == max(model.batch_rates.values())
    assert model.batch_rates[model.best_batch] == model.images_per_second
    images, _, ref_scores = eager_reference
    # An INT8 file, if the fastest, keeps its verdicts within the parity it was shipped with, not every digit.
    tolerance = 1e-4 if model.file.precision == "fp32" else 1e-2
    np.testing.assert_allclose(model.infer(images)[1], ref_scores, rtol=0, atol=tolerance)


@pytest.mark.parametrize(("max_batch", "sizes"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_batch_sizes_timed_at_load_are_powers_of_two_and_the_maximum(max_batch, sizes):
    assert batch_sizes(max_batch) == sizes


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sha256", "model.pt2", "model.cpu.pt2", "model.ov.bin"])
def test_a_one_byte_change_to_any_file_is_refused_naming_it(bundle, tmp_path, name):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    target = copy / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=name.replace(".", r"\.")):
        load_model(copy)


def test_missing_file_wrong_version_and_unknown_backend_are_named(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "model.pt2").unlink()
    with pytest.raises(BundleError, match=r"model\.pt2.*missing"):
        load_model(copy)
    shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    raw = json.loads((copy / MANIFEST_NAME).read_text())
    raw["version"] = 99
    (copy / MANIFEST_NAME).write_text(json.dumps(raw))
    (copy / MANIFEST_DIGEST_NAME).write_text(sha256_file(copy / MANIFEST_NAME))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        load_model(copy)
    with pytest.raises(BundleError, match="unknown backend"):
        load_model(bundle, "gpu-please")


def test_export_of_both_heads_lists_each_with_its_files_figures_and_the_recommended_head(bundles, tiny_run):
    manifest = Manifest.model_validate_json((bundles[0] / MANIFEST_NAME).read_text())
    radar, validation = json.loads((tiny_run / "radar.json").read_text()), json.loads(
        (tiny_run / "validation.json").read_text())
    assert manifest.head_names == ["norm-guided", "radar"]
    assert [f.path for f in manifest.head("norm-guided").files] == ["model.pt2"]
    assert [f.path for f in manifest.head("radar").files] == ["radar.pt2"]
    assert all((bundles[0] / f.path).is_file() for f in manifest.files)
    head = manifest.head("radar")
    assert head.method.model_dump(include={"t", "discrepancy", "window", "map_scale"}) == radar["constants"]
    assert (head.method.blur_ksize, head.method.sobel_ksize) == (5, 5)
    assert head.method.one_class.model_dump() == radar["one_class"]
    assert head.thresholds == ThresholdSpec.model_validate(radar["thresholds"]["false_reject_rate"])
    assert head.metrics["validation_selection"] == radar["validation"]["selection"]
    assert manifest.head("norm-guided").metrics["validation_selection"] == validation["selection"]
    better = "radar" if radar["validation"]["selection"] > validation["selection"] else "norm-guided"
    assert manifest.recommended_head == better


def test_a_run_without_radar_json_exports_norm_guided_only_and_refuses_radar(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("radar.json", "eval"))
    assert main(["export", str(run), "--out", str(tmp_path / "radar"), "--head", "radar"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "radar.json: missing" in err, err
    assert not (tmp_path / "radar").exists()
    assert main(["export", str(run), "--out", str(tmp_path / "both"), "--target", "portable", "--max-batch", "2"]) == 0
    assert "no radar.json: norm-guided head only" in capsys.readouterr().out
    manifest = Manifest.model_validate_json((tmp_path / "both" / MANIFEST_NAME).read_text())
    assert manifest.head_names == ["norm-guided"] and manifest.recommended_head == "norm-guided"
    with pytest.raises(BundleError, match=r"the bundle has no radar head \(its heads: norm-guided\)$"):
        load_model(tmp_path / "both", head="radar")


def test_a_station_never_starts_a_file_compiled_for_cpu_features_it_lacks(bundle, monkeypatch):
    # An AVX-only CPU: the AOT package (x86-64-v3) would die with SIGILL; the portable program runs.
    monkeypatch.setattr("edge.runtime.loader.station_cpu_features", lambda: frozenset({"sse4_2", "avx"}))
    model = load_model(bundle, "auto", head="norm-guided")
    assert model.file.path != "model.cpu.pt2" and model.backend.key in ("exported-cpu", "openvino-cpu")
    bf16 = [f"{f.path} needs CPU features this station lacks: avx512_bf16"
            for f in Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text()).head("norm-guided").files
            if f.precision == "bf16" and f.format == "openvino-ir"]  # built where the exporting CPU has bf16
    assert model.passed_over == ["model.cpu.pt2 needs CPU features this station lacks: abm, avx2, bmi1, bmi2, cx16, "
                                 "f16c, fma, lahf_lm, movbe, popcnt, sse4_1, ssse3, xsave", *bf16]
    with pytest.raises(BundleError, match=r"no backend aoti-cpu on this machine can run .*model\.cpu\.pt2 needs CPU "
                                          r"features this station lacks: abm, avx2"):
        load_model(bundle, "aoti-cpu", head="norm-guided")


def test_the_demo_bundle_runs_where_no_cpu_feature_can_be_read(monkeypatch):
    monkeypatch.setattr("edge.runtime.loader.station_cpu_features", lambda: frozenset())
    model = load_model(DEMO_BUNDLE, "auto")
    assert model.backend.key == "exported-cpu" and model.passed_over == []
