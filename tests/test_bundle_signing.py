"""Signed bundles: a station with trusted keys loads only what one of them signed, checked before
any bundle file is deserialised, and no bundle file reaches Python's unpickler."""

import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from mqtt_broker import Subscriber
from station_process import PREFIX

from edge.runtime.bundle import BundleError
from edge.runtime.loader import load_model
from edge.runtime.program_archive import ArchiveRefused, check_program_archive
from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, sha256_file
from protocols.messages import Status
from protocols.signing import SIGNATURE_NAME, load_trusted_keys
from trainer.cli import main as trainer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, Path]:
    """A trusted key (its public half in `trusted/`) and an untrusted one."""
    root = tmp_path_factory.mktemp("keys")
    assert trainer(["keygen", "--out", str(root / "owner")]) == 0
    assert trainer(["keygen", "--out", str(root / "stranger")]) == 0
    (root / "trusted").mkdir()
    shutil.copy(root / "owner" / "bundle-signing.pub", root / "trusted" / "owner.pub")
    return {"owner": root / "owner" / "bundle-signing.key", "stranger": root / "stranger" / "bundle-signing.key",
            "trusted": root / "trusted"}


def signed_copy(source: Path, out: Path, key: Path | None) -> Path:
    shutil.copytree(source, out)
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    if key is not None:
        assert trainer(["sign", str(out), "--sign-key", str(key)]) == 0
    return out


class Bomb:
    """Unpickling it creates a directory: proof that a file reached Python's unpickler."""

    def __init__(self, sentinel: Path):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return os.mkdir, (self.sentinel,)


def bomb_bundle(source: Path, out: Path, sentinel: Path) -> Path:
    """`source` with its program's example inputs replaced by a pickle bomb; the manifest lists the
    new file's hash, so every digest checks out: only a signature or the loader can stop it.
    torch.export.load unpickles this entry without restriction when the restricted unpickler
    refuses it (torch/_export/serde/serialize.py, deserialize_torch_artifact)."""
    shutil.copytree(source, out)
    program = out / "model.pt2"
    with zipfile.ZipFile(source / "model.pt2") as original, zipfile.ZipFile(program, "w") as rewritten:
        for info in original.infolist():
            data = original.read(info.filename)
            if info.filename.endswith("data/sample_inputs/model.pt"):
                data = pickle.dumps(Bomb(sentinel))
            rewritten.writestr(info.filename, data)
    manifest = Manifest.model_validate_json((out / MANIFEST_NAME).read_text())
    heads = [h.model_copy(update={"files": [f.model_copy(update={"sha256": sha256_file(program)})
                                            if f.path == "model.pt2" else f for f in h.files]})
             for h in manifest.heads]
    (out / MANIFEST_NAME).write_text(manifest.model_copy(update={"heads": heads}).model_dump_json(indent=2))
    (out / MANIFEST_DIGEST_NAME).write_text(sha256_file(out / MANIFEST_NAME) + "\n")
    (out / SIGNATURE_NAME).unlink(missing_ok=True)
    return out


def test_export_signs_and_a_station_with_the_key_loads_it_naming_the_signer(tiny_run, keys, tmp_path):
    out = tmp_path / "signed"
    assert trainer(["export", str(tiny_run), "--out", str(out), "--target", "portable", "--max-batch", "2",
                    "--sign-key", str(keys["owner"])]) == 0
    model = load_model(out, "exported-cpu", keys["trusted"])
    assert model.bundle.signer == json.loads((out / SIGNATURE_NAME).read_text())["key_id"]
    assert model.bundle.signer in load_trusted_keys(keys["trusted"])
    assert not list(tmp_path.glob("*partial*"))


def test_a_threshold_change_needs_a_new_signature_and_trainer_sign_gives_it(bundles, keys, tmp_path):
    bundle = signed_copy(bundles[0], tmp_path / "b", keys["owner"])
    raw = json.loads((bundle / MANIFEST_NAME).read_text())
    for head in raw["heads"]:
        head["thresholds"]["image"] = 0.5
    (bundle / MANIFEST_NAME).write_text(json.dumps(raw))
    (bundle / MANIFEST_DIGEST_NAME).write_text(sha256_file(bundle / MANIFEST_NAME))
    with pytest.raises(BundleError, match="signature .* does not match this manifest"):
        load_model(bundle, "exported-cpu", keys["trusted"])
    assert trainer(["sign", str(bundle), "--sign-key", str(keys["owner"])]) == 0
    assert load_model(bundle, "exported-cpu", keys["trusted"]).head.thresholds.image == 0.5


def test_trainer_sign_refuses_a_bundle_whose_files_do_not_match(bundles, keys, tmp_path, capsys):
    bundle = signed_copy(bundles[0], tmp_path / "b", None)
    with open(bundle / "model.pt2", "r+b") as f:
        f.seek(100)
        f.write(b"\xff")
    assert trainer(["sign", str(bundle), "--sign-key", str(keys["owner"])]) == 1
    assert "model.pt2: sha256 does not match the manifest; not signing" in capsys.readouterr().err
    assert not (bundle / SIGNATURE_NAME).exists()


@pytest.mark.parametrize(("case", "reason"), [
    ("unsigned", r"manifest\.sig: missing: unsigned bundle"),
    ("stranger", r"manifest\.sig: signed by key [0-9a-f]{16}, which is not a trusted key"),
    ("flip manifest.json", r"manifest\.json: sha256 does not match manifest\.sha256"),
    ("flip manifest.sha256", r"manifest\.json: sha256 does not match manifest\.sha256"),
    ("flip manifest.sig", r"manifest\.sig: (not a bundle signature|the signature .* does not match|signed by key)"),
    ("flip model.pt2", r"model\.pt2: sha256 does not match the manifest"),
])
def test_refused_before_any_file_is_deserialised(bundles, keys, tmp_path, case, reason):
    """Each bundle's program is a pickle bomb: had any step loaded it, the sentinel would exist."""
    sentinel = tmp_path / "exploded"
    bundle = bomb_bundle(bundles[0], tmp_path / "bomb", sentinel)
    if case != "unsigned":
        assert trainer(["sign", str(bundle), "--sign-key", str(keys["owner" if "flip" in case else case])]) == 0
    if case.startswith("flip "):
        target = bundle / case.removeprefix("flip ")
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x01
        target.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=reason) as refused:
        load_model(bundle, "auto", keys["trusted"])
    assert "\n" not in str(refused.value)
    assert not sentinel.exists()


def test_a_trusted_signature_still_never_lets_a_bundle_file_reach_the_unpickler(bundles, keys, tmp_path):
    sentinel = tmp_path / "exploded"
    bundle = bomb_bundle(bundles[0], tmp_path / "bomb", sentinel)
    assert trainer(["sign", str(bundle), "--sign-key", str(keys["owner"])]) == 0
    with pytest.raises(BundleError, match=r"model\.pt2: cannot be loaded by exported-cpu: Weights only load failed"):
        load_model(bundle, "exported-cpu", keys["trusted"], head="norm-guided")
    assert not sentinel.exists()
    # The bomb is real: torch's own loader, unguarded, sets it off.
    with pytest.raises(Exception):
        torch.export.load(bundle / "model.pt2")
    assert sentinel.exists()


@pytest.mark.parametrize(("entry", "allowed", "refused"), [
    ("model/data/aotinductor/model/model.so", True, "compiled native code"),
    ("model/data/constants/opaque_obj_0", True, "Python-pickled object"),
    ("model/data/constants/custom_obj_0", False, "TorchScript object"),
    ("model/data/constants/custom_obj_0", True, None),
])
def test_program_archives_with_code_or_pickled_objects_are_refused(tmp_path, entry, allowed, refused):
    archive = tmp_path / "p.pt2"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("model/models/model.json", "{}")
        zf.writestr(entry, b"x")
    if refused is None:
        check_program_archive(archive, allow_script_objects=allowed)
    else:
        with pytest.raises(ArchiveRefused, match=refused):
            check_program_archive(archive, allow_script_objects=allowed)


def test_trusted_keys_dir_without_keys_is_a_clear_error(bundles, tmp_path):
    with pytest.raises(BundleError, match="holds no \\*.pub key"):
        load_model(bundles[0], "exported-cpu", tmp_path)
    with pytest.raises(BundleError, match="not a directory"):
        load_model(bundles[0], "exported-cpu", tmp_path / "missing")


@pytest.mark.parametrize("case", ["unsigned", "stranger", "tampered"])
def test_the_station_refuses_at_start_in_one_line(bundles, keys, tmp_path, case):
    bundle = signed_copy(bundles[0], tmp_path / "b", None if case == "unsigned" else keys[
        "stranger" if case == "stranger" else "owner"])
    if case == "tampered":
        with open(bundle / "model.pt2", "r+b") as f:
            f.seek(1000)
            byte = f.read(1)
            f.seek(1000)
            f.write(bytes([byte[0] ^ 1]))
    config = tmp_path / "edge.toml"
    config.write_text(f'bundle = "{bundle}"\nstate_dir = "{tmp_path / "state"}"\nmetrics_port = 0\n'
                      f'trusted_keys_dir = "{keys["trusted"]}"\n[zmq]\nbind = "tcp://127.0.0.1:*"\n')
    done = subprocess.run([sys.executable, "-m", "edge", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    expected = {"unsigned": "unsigned bundle", "stranger": "not a trusted key",
                "tampered": "model.pt2: sha256 does not match"}[case]
    assert done.stderr.count("\n") == 1 and expected in done.stderr, done.stderr


def test_reloads_refuse_unsigned_untrusted_and_tampered_bundles_and_keep_serving(
        bundles, keys, tmp_path, daemon_factory, broker):
    current = signed_copy(bundles[0], tmp_path / "current", keys["owner"])
    daemon = daemon_factory(current, reload_watch=True, sections={"trusted_keys_dir": str(keys["trusted"])})
    original_sha = (current / MANIFEST_DIGEST_NAME).read_text().strip()

    def deploy(source: Path) -> None:
        """In place, the digest last (what the station watches), as `cp` of a bundle would."""
        (current / SIGNATURE_NAME).unlink(missing_ok=True)
        for path in sorted(source.iterdir(), key=lambda p: p.name == MANIFEST_DIGEST_NAME):
            shutil.copyfile(path, current / path.name)

    sentinel = tmp_path / "exploded"
    unsigned = bomb_bundle(bundles[1], tmp_path / "unsigned", sentinel)
    stranger = signed_copy(unsigned, tmp_path / "stranger", keys["stranger"])
    tampered = signed_copy(bundles[1], tmp_path / "tampered", keys["owner"])
    with open(tampered / "model.pt2", "r+b") as f:
        f.seek(2000)
        f.write(b"\x00\x01")
    with Subscriber(broker.port, f"{PREFIX}/#") as sub:
        # A watch tick may fall mid-copy and refuse a half-copied bundle too: wait for each reason.
        for bundle, reason in [(unsigned, b"unsigned bundle"), (stranger, b"not a trusted key"),
                               (tampered, b"model.pt2: sha256 does not match")]:
            deploy(bundle)
            sub.wait_until(f"{PREFIX}/error", lambda ms: any(b"model reload refused" in m.payload
                                                             and reason in m.payload for m in ms), 60)
            assert daemon.process.poll() is None
        good = signed_copy(bundles[1], tmp_path / "good", keys["owner"])
        deploy(good)  # the manifest and its signature are the tampered bundle's: the watch sees no change
        daemon.send(signal.SIGHUP)
        new_sha = (good / MANIFEST_DIGEST_NAME).read_text().strip()
        statuses = sub.wait_until(f"{PREFIX}/status", lambda ms: Status.model_validate_json(ms[-1].payload).model.sha256
                                  == new_sha, 60)
    assert not sentinel.exists()
    served = {Status.model_validate_json(m.payload).model.sha256 for m in statuses}
    assert served == {original_sha, new_sha}, "only bundles signed by the trusted key ever served"
    assert '"signed_by"' in daemon.log_path.read_text()
