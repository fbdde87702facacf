import json
import shutil
from pathlib import Path

import pytest

from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, sha256_file

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"


@pytest.fixture(scope="session")
def datasets_dir() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATASETS} (../shared beside the repo)")
    return SHARED_DATASETS


def hazelnut_images(datasets: Path, size: int, count: int):
    """Real test images (good and defective) as uint8 RGB [count, size, size, 3]."""
    import cv2
    import numpy as np

    paths = sorted((datasets / "hazelnut" / "test").rglob("*.jpg"))[:: 3][:count]
    images = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in paths]
    return np.stack([cv2.resize(im, (size, size), interpolation=cv2.INTER_AREA) for im in images])


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, datasets_dir) -> Path:
    """A tiny model trained for a few steps on real images: enough to export and serve."""
    from trainer.cli import main

    config = tmp_path_factory.mktemp("config") / "tiny.toml"
    config.write_text('profile = "tiny"\nbatch_size = 4\nnum_workers = 0\nval_every = 4\n')
    run = tmp_path_factory.mktemp("runs") / "tiny"
    assert main(["fit", str(datasets_dir / "hazelnut"), "--out", str(run), "--config", str(config),
                 "--max-steps", "4"]) == 0
    return run


@pytest.fixture(scope="session")
def bundles(tiny_run: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Two portable bundles of the tiny run (both heads) with different identities (for hot swaps)."""
    from trainer.cli import main

    root = tmp_path_factory.mktemp("daemon-bundles")
    assert main(["export", str(tiny_run), "--out", str(root / "a"), "--max-batch", "16", "--target", "portable"]) == 0
    # The same files under another identity: a second export would only cost time.
    shutil.copytree(root / "a", root / "b")
    manifest = json.loads((root / "b" / MANIFEST_NAME).read_text())
    manifest["model"]["version"] += "-b"
    (root / "b" / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2))
    (root / "b" / MANIFEST_DIGEST_NAME).write_text(sha256_file(root / "b" / MANIFEST_NAME))
    return root / "a", root / "b"


@pytest.fixture(scope="session")
def cpu_bundle(tiny_run: Path, tmp_path_factory) -> tuple[Path, str]:
    """One `--target cpu` bundle of both heads (program, AOT package, OpenVINO IR fp32 and, within
    parity, INT8), shared because compiling it is the slowest export; and what the export printed."""
    import contextlib
    import io

    from trainer.cli import main

    out = tmp_path_factory.mktemp("cpu-bundle") / "tiny"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["export", str(tiny_run), "--out", str(out), "--target", "cpu", "--max-batch", "4"]) == 0
    return out, printed.getvalue()


@pytest.fixture(scope="session")
def hazelnut_dir(datasets_dir: Path) -> Path:
    return datasets_dir / "hazelnut" / "test"


@pytest.fixture
def broker(tmp_path):
    from mqtt_broker import Broker

    with Broker(tmp_path) as running:
        yield running


@pytest.fixture
def outbox(tmp_path):
    """An outbox in the test's own state directory."""
    from edge.mqtt.outbox import Outbox

    box = Outbox(tmp_path / "state")
    yield box
    box.close()


@pytest.fixture
def daemon_factory(tmp_path, broker):
    """`make(bundle, workdir=None, reload_watch=False, sections=None, **inference)` starts `edge serve`
    on the test's broker and waits until it is ready; every daemon is killed at the end."""
    from station_process import DaemonProcess

    started = []

    def make(bundle: Path, workdir: Path | None = None, **options) -> "DaemonProcess":
        daemon = DaemonProcess(workdir or tmp_path, bundle, broker, **options)
        started.append(daemon)
        return daemon.start()

    yield make
    for daemon in started:
        daemon.kill()
