"""Reading a model bundle safely. In this order, and nothing is deserialised before its step:
1. the manifest's bytes are read once and must match `manifest.sha256`;
2. with trusted keys, `manifest.sig` must be a valid signature over that digest by one of them;
3. the manifest (JSON, the bytes of step 1) is validated;
4. every listed file is copied into a private directory, hashed while it is copied, and must
   match the manifest.
Backends load only those private copies, so a file changed in the bundle directory after it was
checked is never what runs. Whatever is wrong is named in one line."""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, SUPPORTED_BUNDLE_VERSIONS, Manifest
from protocols.signing import SIGNATURE_NAME, BundleSignature, SignatureError, TrustedKeys, verify_signature

# Far above any real manifest or signature; a larger file is refused unread.
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 4096


class BundleError(Exception):
    """A bundle that must not be served; the message names the file and the problem."""


@dataclass(frozen=True)
class VerifiedBundle:
    root: Path  # the bundle directory, for naming things in messages
    manifest: Manifest
    manifest_sha256: str  # identifies this exact bundle in results and status messages
    signer: str | None  # key id of the trusted key that signed it (None: no trusted keys configured)
    copies: dict[str, Path]  # manifest path -> its verified private copy (valid while loading)


def _read_small(path: Path, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise BundleError(f"{path}: missing") from None
    except OSError as err:
        raise BundleError(f"{path}: unreadable ({err.strerror})") from None
    if len(data) > limit:
        raise BundleError(f"{path}: larger than {limit} bytes")
    return data


def _check_signature(root: Path, manifest_sha256: str, trusted_keys: TrustedKeys) -> str:
    path = root / SIGNATURE_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing: unsigned bundle, and this station loads only bundles signed by a "
                          "trusted key (trusted_keys_dir)")
    try:
        signature = BundleSignature.model_validate_json(_read_small(path, MAX_SIGNATURE_BYTES))
    except ValidationError as err:
        raise BundleError(f"{path}: not a bundle signature ({err.errors()[0]['msg']})") from None
    try:
        return verify_signature(signature, manifest_sha256, trusted_keys)
    except SignatureError as err:
        raise BundleError(f"{path}: {err}") from None


def _parse_manifest(path: Path, data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{path}: not valid JSON ({err})") from None
    if isinstance(raw, dict) and raw.get("version") not in SUPPORTED_BUNDLE_VERSIONS:
        raise BundleError(f"{path}: bundle version {raw.get('version')!r} is not supported "
                          f"(this station reads versions {', '.join(map(str, SUPPORTED_BUNDLE_VERSIONS))})")
    try:
        return Manifest.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        raise BundleError(f"{path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None


def _copy_verified(source: Path, target: Path, expected_sha256: str) -> None:
    digest = hashlib.sha256()
    try:
        with open(source, "rb") as src, open(target, "xb") as dst:
            while block := src.read(1 << 20):
                digest.update(block)
                dst.write(block)
    except FileNotFoundError:
        raise BundleError(f"{source}: listed in the manifest but missing") from None
    except OSError as err:
        raise BundleError(f"{source}: cannot be copied for loading ({err.strerror})") from None
    if digest.hexdigest() != expected_sha256:
        raise BundleError(f"{source}: sha256 does not match the manifest (corrupt or tampered)")


def verify_bundle(root: Path, trusted_keys: TrustedKeys | None, copy_dir: Path) -> VerifiedBundle:
    """Verify the bundle at `root` (see the module docstring) and copy its files into `copy_dir`,
    an empty directory only this process can write. With `trusted_keys`, it must be signed by one."""
    manifest_path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"{root}: not a directory (a bundle is a directory with {MANIFEST_NAME})")
    manifest_bytes = _read_small(manifest_path, MAX_MANIFEST_BYTES)
    expected_digest = _read_small(root / MANIFEST_DIGEST_NAME, 128).decode("ascii", "replace").strip()
    manifest_sha256 = hashlib.sha256(manifest_bytes).hexdigest()
    if manifest_sha256 != expected_digest:
        raise BundleError(f"{manifest_path}: sha256 does not match {MANIFEST_DIGEST_NAME} (corrupt or tampered)")
    signer = _check_signature(root, manifest_sha256, trusted_keys) if trusted_keys is not None else None
    manifest = _parse_manifest(manifest_path, manifest_bytes)
    copies = {}
    for entry in manifest.files:
        source = (root / entry.path).resolve()
        if source.parent != root.resolve():  # a link out of the bundle (the manifest allows file names only)
            raise BundleError(f"{manifest_path}: file {entry.path!r} lies outside the bundle")
        # Copies keep their names: loaders look at suffixes, and OpenVINO finds an IR's weights beside it.
        copies[entry.path] = copy_dir / entry.path
        _copy_verified(source, copies[entry.path], entry.sha256)
    return VerifiedBundle(root, manifest, manifest_sha256, signer, copies)
