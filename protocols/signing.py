"""Bundle signatures: who made a bundle, checkable before any of it is read.

`manifest.sig` holds an Ed25519 signature over the manifest's sha256 (the `manifest.sha256`
digest). The manifest lists every file's sha256, so one signature covers the whole bundle, and a
threshold change only needs a new signature, not a new export. Keys are PEM files: the private key
(PKCS #8) stays with whoever exports bundles; stations hold public keys (`*.pub`) in their
`trusted_keys_dir`.

Needs the `cryptography` package (the edge and trainer extras), unlike the rest of `protocols`.
"""

import base64
import binascii
import hashlib
import os
from pathlib import Path
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field

SIGNATURE_NAME = "manifest.sig"
PUBLIC_KEY_SUFFIX = ".pub"
PRIVATE_KEY_SUFFIX = ".key"
# Prefixed to the digest before signing, so a bundle-signing key's signature can never be
# replayed as a signature over anything else (and no other signature passes as one of ours).
_CONTEXT = b"diffusionad-inspect bundle manifest sha256 "

TrustedKeys = dict[str, Ed25519PublicKey]  # key id -> key


class SignatureError(ValueError):
    """A signature or key that cannot be used; the message says why."""


class BundleSignature(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    algorithm: Literal["ed25519"] = "ed25519"
    key_id: str = Field(pattern=r"^[0-9a-f]{16}$", description="names the signing key (see key_id())")
    signature: str = Field(description="base64 Ed25519 signature over the context and the manifest digest")


def key_id(public_key: Ed25519PublicKey) -> str:
    """A short name for a public key: the first 16 hex digits of the sha256 of its 32 raw bytes."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def sign_digest(manifest_sha256: str, private_key: Ed25519PrivateKey) -> BundleSignature:
    signature = private_key.sign(_CONTEXT + manifest_sha256.encode())
    return BundleSignature(key_id=key_id(private_key.public_key()), signature=base64.b64encode(signature).decode())


def verify_signature(signature: BundleSignature, manifest_sha256: str, trusted: TrustedKeys) -> str:
    """The id of the trusted key that made `signature` over this digest; SignatureError otherwise."""
    key = trusted.get(signature.key_id)
    if key is None:
        raise SignatureError(f"signed by key {signature.key_id}, which is not a trusted key "
                             f"(trusted: {', '.join(sorted(trusted))})")
    try:
        key.verify(base64.b64decode(signature.signature, validate=True), _CONTEXT + manifest_sha256.encode())
    except (InvalidSignature, binascii.Error, ValueError):
        raise SignatureError(f"the signature by key {signature.key_id} does not match this manifest "
                             "(manifest or signature altered)") from None
    return signature.key_id


def write_key_pair(out_dir: Path, name: str) -> tuple[Path, Path]:
    """A new signing key pair: `<name>.key` (private, mode 0600) and `<name>.pub`. Refuses to overwrite."""
    private_path, public_path = out_dir / f"{name}{PRIVATE_KEY_SUFFIX}", out_dir / f"{name}{PUBLIC_KEY_SUFFIX}"
    for path in (private_path, public_path):
        if path.exists():
            raise SignatureError(f"{path}: exists; not overwriting a key")
    out_dir.mkdir(parents=True, exist_ok=True)
    private_key = Ed25519PrivateKey.generate()
    private_pem = private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption())
    # Created 0600, never briefly readable by others.
    with os.fdopen(os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(private_key.public_key().public_bytes(serialization.Encoding.PEM,
                                                                   serialization.PublicFormat.SubjectPublicKeyInfo))
    return private_path, public_path


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except OSError as err:
        raise SignatureError(f"{path}: cannot read the signing key ({err.strerror})") from None
    except (ValueError, TypeError) as err:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({err})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: not an Ed25519 key (bundles are signed with Ed25519)")
    return key


def load_trusted_keys(directory: Path) -> TrustedKeys:
    """Every `*.pub` Ed25519 public key in `directory`, by key id; SignatureError if there is none
    or one cannot be read (a station must not silently trust fewer keys than its owner put there)."""
    if not directory.is_dir():
        raise SignatureError(f"trusted_keys_dir {directory}: not a directory")
    keys: TrustedKeys = {}
    for path in sorted(directory.glob(f"*{PUBLIC_KEY_SUFFIX}")):
        try:
            key = serialization.load_pem_public_key(path.read_bytes())
        except (OSError, ValueError) as err:
            raise SignatureError(f"{path}: not a readable PEM public key ({err})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SignatureError(f"{path}: not an Ed25519 public key")
        keys[key_id(key)] = key
    if not keys:
        raise SignatureError(f"trusted_keys_dir {directory}: holds no *{PUBLIC_KEY_SUFFIX} key")
    return keys
