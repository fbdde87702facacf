"""A tiled model end to end: `fit` with tiles_per_side trains on tiles of larger frames, the bundle
states its tiling, and a station serves whole frames with the scores of the bundle's own program."""

import json

import numpy as np
import pytest
import torch
from mqtt_broker import Subscriber
from station_process import PREFIX, results_by_frame
from test_daemon_heads import hazelnut_frames

from protocols.bundle import MANIFEST_NAME, Manifest
from protocols.publisher import FramePublisher
from trainer import run_dir as files
from trainer.cli import main as trainer
from trainer.evaluate import held_out_data, load_run
from trainer.validation import validate

pytestmark = pytest.mark.slow
FRAMES = 6


def test_a_tiled_bundle_is_served_whole_frames_with_its_programs_scores(datasets_dir, hazelnut_dir, tmp_path,
                                                                      daemon_factory, broker):
    config = tmp_path / "tiled.toml"
    config.write_text('profile = "tiny"\nbatch_size = 2\nnum_workers = 0\nval_every = 2\ntiles_per_side = 2\n')
    run, bundle = tmp_path / "run", tmp_path / "bundle"
    assert trainer(["fit", str(datasets_dir / "hazelnut"), "--out", str(run), "--config", str(config),
                    "--max-steps", "2"]) == 0
    # chosen on tiles, compared with RADAR on whole frames
    chosen = files.read_json(run / files.VALIDATION)
    on_tiles = [line["validation"] for line in map(json.loads, (run / files.LOG).read_text().splitlines())
                if "validation" in line]
    assert [chosen["chosen_on_tiles"]] == [{k: r[k] for k in ("image_auroc", "pixel_ap", "selection")} for r in on_tiles]
    cfg, model, _ = load_run(run)
    on_frames = validate(model, cfg.method, held_out_data(run, cfg).validation, torch.device("cpu"))
    assert {k: chosen[k] for k in on_frames} == pytest.approx(on_frames, abs=1e-6)
    assert trainer(["export", str(run), "--out", str(bundle), "--target", "portable", "--max-batch", "4"]) == 0
    manifest = Manifest.model_validate_json((bundle / MANIFEST_NAME).read_text())
    assert (manifest.input.height, manifest.input.width) == (112, 112)  # 64 px tiles, 2 a side, stride 48
    assert manifest.input.tiling.model_dump() == {"tile": 64, "per_side": 2, "stride": 48}
    head = manifest.head("norm-guided")
    frames = hazelnut_frames(hazelnut_dir, 112, FRAMES)
    daemon = daemon_factory(bundle, head="norm-guided")
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        with FramePublisher(daemon.endpoint) as camera:
            for i, frame in enumerate(frames):
                camera.send_image(frame, f"{i:06d}", pixel_format="rgb8")
        results = results_by_frame(sub, FRAMES)
    program = torch.export.load(bundle / "model.pt2").module()
    with torch.no_grad():
        expected = np.concatenate([program(torch.from_numpy(frames[i:i + 4]))[1].numpy() for i in range(0, FRAMES, 4)])
    assert sorted(results) == [f"{i:06d}" for i in range(FRAMES)]
    for i in range(FRAMES):
        result = results[f"{i:06d}"]
        assert result.score == pytest.approx(expected[i], abs=1e-5)
        assert result.verdict == ("fail" if result.score >= head.thresholds.image else "pass")
    assert np.isfinite(expected).all()
