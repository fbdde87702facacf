"""`trainer export` → bundle → edge runtime: parity on real images, and tampering refused."""

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
from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, sha256_file
from trainer.cli import main
from trainer.evaluate import load_run

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def bundle(tiny_run: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny"
    assert main(["export", str(tiny_run), "--out", str(out), "--target", "cpu", "--max-batch", "4"]) == 0
    return out


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
    assert manifest.input.height == manifest.input.width == 64 and manifest.input.max_batch == 4
    assert (manifest.method.t_s, manifest.method.t_b, manifest.method.top_k) == (200, 400, 50)
    assert manifest.thresholds.image == thresholds["false_reject_rate"]["image"]
    assert [(f.path, f.format) for f in manifest.files] == [("model.pt2", "torch.export"),
                                                            ("model.cpu.pt2", "aoti-package")]
    assert len(manifest.provenance.data_fingerprint) == 64
    assert "validation_image_auroc" in manifest.metrics
    assert not list(bundle.parent.glob(".*partial")), "staging directory left behind"


def backends_here(bundle: Path):
    """Every backend that runs on this machine, each on its file."""
    manifest = Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text())
    yield ExportedCpuBackend(bundle / "model.pt2", manifest)
    aoti = bundle / "model.cpu.pt2"
    yield AotiCpuBackend(aoti, manifest)


def test_every_backend_matches_eager_with_identical_verdicts(bundle, eager_reference):
    images, ref_maps, ref_scores = eager_reference
    threshold = Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text()).thresholds.image
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
    model = load_model(bundle, "auto")
    assert model.backend.key in ("exported-cpu", "aoti-cpu") and model.images_per_second > 0
    assert list(model.batch_rates) == batch_sizes(4) and all(rate > 0 for rate in model.batch_rates.values())
    assert model.images_per_second == max(model.batch_rates.values())
    assert model.batch_rates[model.best_batch] == model.images_per_second
    images, _, ref_scores = eager_reference
    np.testing.assert_allclose(model.infer(images)[1], ref_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("max_batch", "sizes"), [(1, [1]), (2, [1, 2]), (6, [1, 2, 4, 6]), (8, [1, 2, 4, 8])])
def test_batch_sizes_timed_at_load_are_powers_of_two_and_the_maximum(max_batch, sizes):
    assert batch_sizes(max_batch) == sizes


@pytest.mark.parametrize("name", ["manifest.json", "manifest.sha256", "model.pt2", "model.cpu.pt2"])
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
