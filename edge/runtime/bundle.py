"""Reading a model bundle safely: the manifest is validated and every file's sha256 verified
before anything is loaded; whatever is wrong is named."""

import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from protocols.bundle import BUNDLE_VERSION, MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, sha256_file


class BundleError(Exception):
    """A bundle that must not be served; the message names the file and the problem."""


@dataclass(frozen=True)
class VerifiedBundle:
    root: Path
    manifest: Manifest
    manifest_sha256: str  # identifies this exact bundle in results and status messages


def _parse_manifest(path: Path) -> Manifest:
    try:
        raw = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise BundleError(f"{path}: missing (not a model bundle)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, dict) and raw.get("version") != BUNDLE_VERSION:
        raise BundleError(f"{path}: bundle version {raw.get('version')!r} is not supported "
                          f"(this station reads version {BUNDLE_VERSION})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise BundleError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def verify_bundle(root: Path) -> VerifiedBundle:
    manifest_path, digest_path = root / MANIFEST_NAME, root / MANIFEST_DIGEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (a bundle is a directory with {MANIFEST_NAME})")
    try:
        expected_digest = digest_path.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        raise BundleError(f"{digest_path}: missing or unreadable") from None
    manifest_digest = sha256_file(manifest_path) if manifest_path.is_file() else None
    if manifest_digest is not None and manifest_digest != expected_digest:
        raise BundleError(f"{manifest_path}: sha256 does not match {MANIFEST_DIGEST_NAME} (corrupt or tampered)")
    manifest = _parse_manifest(manifest_path)
    for entry in manifest.files:
        path = (root / entry.path).resolve()
        if root.resolve() not in path.parents:
            raise BundleError(f"{manifest_path}: file {entry.path!r} lies outside the bundle")
        if not path.is_file():
            raise BundleError(f"{root / entry.path}: listed in the manifest but missing")
        if sha256_file(path) != entry.sha256:
            raise BundleError(f"{root / entry.path}: sha256 does not match the manifest (corrupt or tampered)")
    return VerifiedBundle(root, manifest, expected_digest)
