"""`trainer calibrate`: thresholds of every head from other good images, into a run (then export)
or into a copy of a bundle, which a station then serves."""

import json
import shutil

import pytest
from mqtt_broker import Subscriber
from station_process import PREFIX, results_by_frame

from edge.replay import replay
from protocols.bundle import MANIFEST_NAME, Manifest
from trainer.cli import main as trainer

pytestmark = pytest.mark.slow


def test_a_run_recalibrated_on_line_images_is_exported_and_served_with_the_new_thresholds(
        tiny_run, datasets_dir, tmp_path, capsys, daemon_factory, broker, hazelnut_dir):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "thresholds.json").read_text())["false_reject_rate"]
    radar_before = json.loads((run / "radar.json").read_text())["thresholds"]["false_reject_rate"]
    good, defects = datasets_dir / "hazelnut" / "test" / "good", datasets_dir / "hazelnut" / "test" / "colour"
    # 6 line images cannot show 1 %: the run's detection ceiling (line images carry no synthetic
    # defects) still caps what they extrapolate
    assert trainer(["calibrate", str(run), str(good), "--false-reject-rate", "0.01"]) == 0
    assert "too few" in capsys.readouterr().err
    extrapolated = json.loads((run / "thresholds.json").read_text())["false_reject_rate"]
    assert extrapolated["estimator"] == "logit-normal"
    assert (extrapolated["detection_ceiling_image"], extrapolated["detection_ceiling_pixel"]) == (
        before["detection_ceiling_image"], before["detection_ceiling_pixel"])
    assert extrapolated["image"] <= extrapolated["detection_ceiling_image"]
    # 20 % is observed on 6 images (conformal): the target holds, uncapped
    assert trainer(["calibrate", str(run), str(good), "--defects", str(defects), "--false-reject-rate", "0.2"]) == 0
    printed = capsys.readouterr()
    thresholds = json.loads((run / "thresholds.json").read_text())
    after = thresholds["false_reject_rate"]
    assert after["calibration_images"] == len(list(good.iterdir())) and thresholds["calibrated_on"] == str(good.resolve())
    assert after["target_false_reject_rate"] == 0.2 and after["image"] != before["image"]
    assert after["estimator"] == "conformal" and "too few" not in printed.err
    radar = json.loads((run / "radar.json").read_text())["thresholds"]
    radar_after = radar["false_reject_rate"]
    assert radar["calibrated_on"] == str(good.resolve()) and radar_after["calibration_images"] == 6
    assert radar_after["target_false_reject_rate"] == 0.2 and radar_after["image"] != radar_before["image"]
    for head in ("norm-guided", "radar"):
        assert f"{head}: before: image" in printed.out and f"{head}: escapes on the defective images" in printed.out
    assert trainer(["export", str(run), "--out", str(tmp_path / "bundle"), "--target", "portable"]) == 0
    manifest = Manifest.model_validate_json((tmp_path / "bundle" / MANIFEST_NAME).read_text())
    calibrated = {"norm-guided": after, "radar": radar_after}
    for head in manifest.heads:
        shipped = head.thresholds
        assert (shipped.image, shipped.pixel, shipped.calibration_images, shipped.detection_ceiling_image) == (
            calibrated[head.name]["image"], calibrated[head.name]["pixel"], 6,
            calibrated[head.name]["detection_ceiling_image"])
    daemon = daemon_factory(tmp_path / "bundle")
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        assert replay(hazelnut_dir, daemon.endpoint, limit=2) == 2
        results = results_by_frame(sub, 2).values()
    assert {(r.model.head, r.threshold) for r in results} == {
        (manifest.recommended_head, calibrated[manifest.recommended_head]["image"])}


def test_a_run_recalibrated_on_its_own_split_gets_what_fit_wrote_or_a_new_target(tiny_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    fitted = {name: json.loads((run / name).read_text()) for name in ("thresholds.json", "radar.json")}
    assert trainer(["calibrate", str(run)]) == 0
    assert json.loads((run / "thresholds.json").read_text()) == fitted["thresholds.json"]
    radar_again = json.loads((run / "radar.json").read_text())["thresholds"]
    for policy, figures in fitted["radar.json"]["thresholds"].items():  # RADAR's: to float rounding
        if isinstance(figures, str):
            assert radar_again[policy] == figures
            continue
        for key, value in figures.items():
            assert radar_again[policy][key] == (pytest.approx(value, rel=1e-3) if isinstance(value, float) else value)
    assert trainer(["calibrate", str(run), "--false-reject-rate", "0.3"]) == 0
    assert "norm-guided: before: image" in capsys.readouterr().out
    thresholds = json.loads((run / "thresholds.json").read_text())
    radar = json.loads((run / "radar.json").read_text())
    for new, old in ((thresholds, fitted["thresholds.json"]), (radar["thresholds"], fitted["radar.json"]["thresholds"])):
        assert new["false_reject_rate"]["target_false_reject_rate"] == 0.3 and "calibrated_on" not in new
        # 6 images observe 30 % (conformal), unlike the fitted 1 %
        assert new["false_reject_rate"]["estimator"] == "conformal" != old["false_reject_rate"]["estimator"]
        assert new["false_reject_rate"]["image"] != old["false_reject_rate"]["image"]
    assert {k: v for k, v in radar.items() if k != "thresholds"} == {
        k: v for k, v in fitted["radar.json"].items() if k != "thresholds"}, "the head itself is not refitted"


def test_a_recalibrated_bundle_copy_is_what_the_station_serves(bundles, datasets_dir, tmp_path, daemon_factory,
                                                              broker, hazelnut_dir):
    out = tmp_path / "recalibrated"
    good = datasets_dir / "hazelnut" / "test" / "good"
    assert trainer(["calibrate", str(bundles[0]), str(good), "--out", str(out), "--false-reject-rate", "0.2"]) == 0
    old = Manifest.model_validate_json((bundles[0] / MANIFEST_NAME).read_text())
    new = Manifest.model_validate_json((out / MANIFEST_NAME).read_text())
    assert new.head_names == old.head_names == ["norm-guided", "radar"]
    for head in new.head_names:
        assert new.head(head).thresholds.image != old.head(head).thresholds.image
        assert new.head(head).thresholds.target_false_reject_rate == 0.2
    assert new.files == old.files and new.model == old.model, "same graphs: only the thresholds change"
    daemon = daemon_factory(out, head="norm-guided")
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        assert replay(hazelnut_dir, daemon.endpoint, limit=4) == 4
        results = results_by_frame(sub, 4)
    assert {(r.model.head, r.threshold) for r in results.values()} == {
        ("norm-guided", new.head("norm-guided").thresholds.image)}


def test_calibrate_refuses_what_it_cannot_do_in_one_line(bundles, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / MANIFEST_NAME).write_text('{"version": 2}')
    cases = [
        ([str(broken), str(empty), "--out", str(tmp_path / "new")], "manifest.json: model: Field required"),
        ([str(bundles[0]), str(empty)], "give --out for the recalibrated copy"),
        ([str(bundles[0]), str(empty), "--out", str(bundles[1])], "exists; not overwriting"),
        ([str(bundles[0]), str(empty), "--out", str(tmp_path / "new")], "no images"),
        ([str(bundles[0]), str(empty), "--false-reject-rate", "1.5"], "must be in (0, 1)"),
        ([str(bundles[0]), "--out", str(tmp_path / "new")], "give GOOD_DIR"),
    ]
    for args, message in cases:
        assert trainer(["calibrate", *args]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "new").exists()
