"""`trainer sign` and `trainer export --sign-key`: vouch for a bundle with an Ed25519 key.

Signing checks the bundle first (the manifest validates, every listed file matches its sha256),
so a signature never covers files that are not what the manifest says. It then writes
`manifest.sig` and, last, `manifest.sha256`: the digest file is what a station watches for
changes, so by the time it changes the matching signature is already in place."""

import hashlib
from pathlib import Path

from pydantic import ValidationError

from protocols.bundle import MANIFEST_DIGEST_NAME, MANIFEST_NAME, Manifest, sha256_file
from protocols.signing import SIGNATURE_NAME, BundleSignature, load_private_key, sign_digest
from trainer import run_dir as files
from trainer.config import ConfigError


def sign_bundle(bundle: Path, key_file: Path) -> BundleSignature:
    """Sign the bundle's manifest as it is now; ConfigError if the bundle is not consistent."""
    manifest_path = bundle / MANIFEST_NAME
    try:
        manifest_bytes = manifest_path.read_bytes()
        manifest = Manifest.model_validate_json(manifest_bytes)
    except OSError as err:
        raise ConfigError(f"{manifest_path}: cannot read ({err.strerror})") from None
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{manifest_path}: {'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    for entry in manifest.files:
        path = bundle / entry.path
        if not path.is_file():
            raise ConfigError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != entry.sha256:
            raise ConfigError(f"{path}: sha256 does not match the manifest; not signing")
    digest = hashlib.sha256(manifest_bytes).hexdigest()
    signature = sign_digest(digest, load_private_key(key_file))
    files.write_text(bundle / SIGNATURE_NAME, signature.model_dump_json(indent=2) + "\n")
    files.write_text(bundle / MANIFEST_DIGEST_NAME, digest + "\n")
    return signature
