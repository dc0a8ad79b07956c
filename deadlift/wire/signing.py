"""Module signatures: a guest signs what it offers, a host verifies before it runs it.

A signature covers the statement ``deadlift-module/1 OWNER NAME VERSION SHA256``
(one line per field), made with the owner's ed25519 nkey; the host checks it
against the public key the integration declares for that guest. A different
binary, name, version or owner fails the check.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

import nacl.exceptions
import nacl.signing
import nkeys

from deadlift.errors import ConfigError

STATEMENT = "deadlift-module/1"
SEED_ENV = "DEADLIFT_SIGNING_KEY"


def statement(owner: str, name: str, version: str, sha256: str) -> bytes:
    """The bytes a module signature covers."""
    return "\n".join((STATEMENT, owner, name, version, sha256)).encode()


def new_key() -> tuple[str, str]:
    """A fresh signing key: ``(seed, public key)``; keep the seed secret, declare the key."""
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER).decode()
    return seed, public_key(seed)


def _pair(seed: str) -> nkeys.KeyPair:
    try:
        return nkeys.from_seed(bytearray(seed.strip().encode()))
    except (nkeys.NkeysError, binascii.Error, ValueError, IndexError):
        raise ConfigError(
            "signing key: not an nkey seed (it starts with SU); make one with "
            "`deadlift module keygen`"
        ) from None


def public_key(seed: str) -> str:
    """The public key (``U…``) of a seed."""
    key: bytes = _pair(seed).public_key
    return key.decode()


def sign(seed: str, owner: str, name: str, version: str, sha256: str) -> str:
    """The signature (base64url) of a module by the holder of ``seed``."""
    raw: bytes = _pair(seed).sign(statement(owner, name, version, sha256))
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def verify(key: str, signature: str, owner: str, name: str, version: str, sha256: str) -> bool:
    """Whether ``signature`` is ``key``'s signature of this module."""
    try:
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        nacl.signing.VerifyKey(_raw_public(key)).verify(
            statement(owner, name, version, sha256), raw
        )
    except (nacl.exceptions.BadSignatureError, binascii.Error, ValueError, TypeError):
        return False
    return True


def _raw_public(key: str) -> bytes:
    """The 32 ed25519 bytes of a user public nkey (checked: prefix and CRC)."""
    data = base64.b32decode(key + "=" * (-len(key) % 8))
    if len(data) != 35 or data[0] != nkeys.PREFIX_BYTE_USER:
        raise ValueError("not a user public nkey")
    if data[33:] != nkeys.crc16_checksum(data[:33]):
        raise ValueError("public nkey checksum mismatch")
    return bytes(data[1:33])


def read_seed(path: str | None) -> str:
    """The signing seed from ``path``, else from ``DEADLIFT_SIGNING_KEY``.

    Raises:
        ConfigError: neither is given, or the file cannot be read.
    """
    if path:
        try:
            return Path(path).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(
                f"--key {path}: cannot read the signing key: {exc.strerror}"
            ) from None
    seed = os.environ.get(SEED_ENV)
    if not seed:
        raise ConfigError(
            f"no signing key: pass --key FILE or set {SEED_ENV} to the seed (SU…) whose public "
            "key the integration declares as signing_key"
        )
    return seed
