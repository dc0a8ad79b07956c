"""Private certificate authorities for routes and leaf nodes, made with the ``openssl`` CLI.

A :class:`CertificateAuthority` issues the certificates a cluster's routes (see
:mod:`deadlift.ops.cluster`) or a hub's leaf connections (see
:mod:`deadlift.ops.leafnodes`) must present: the listeners trust only their own
CA, so a server that never got one of its certificates cannot join.
:class:`TlsFiles` renders the ``tls {}`` blocks of nats-server configs.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deadlift.errors import DeadliftError
from deadlift.ops.server import write_private

TLS_TIMEOUT_S = 2
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_CA_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,62}$")
_HOST = re.compile(r"^(\*\.)?[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")


@dataclass(frozen=True)
class TlsFiles:
    """A certificate, its private key, and the CA certificate peers must chain to."""

    cert: Path
    key: Path
    ca: Path

    def listener(self) -> dict[str, Any]:
        """A ``tls {}`` block for a route or leaf listener: mutual TLS with this CA
        (a peer must present a certificate it signed)."""
        return {
            "cert_file": str(self.cert),
            "key_file": str(self.key),
            "ca_file": str(self.ca),
            "verify": True,
            "timeout": TLS_TIMEOUT_S,
        }

    def remote(self) -> dict[str, Any]:
        """A ``tls {}`` block for a leaf remote: present this certificate, trust this CA."""
        return {
            "cert_file": str(self.cert),
            "key_file": str(self.key),
            "ca_file": str(self.ca),
            "timeout": TLS_TIMEOUT_S,
        }


def _openssl(*args: str, stdin: bytes | None = None) -> bytes:
    binary = shutil.which("openssl")
    if binary is None:
        raise DeadliftError(
            "openssl not found: it makes the certificates of the cluster's routes and "
            "leaf nodes (install the openssl package)"
        )
    result = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, check=False, timeout=30
    )
    if result.returncode != 0:
        problem = result.stderr.decode(errors="replace").strip()
        raise DeadliftError(f"openssl {args[0]} failed: {problem}")
    return result.stdout


def _subject_alt_names(names: Iterable[str]) -> str:
    seen: list[str] = []
    for name in names:
        try:
            entry = f"IP:{ipaddress.ip_address(name)}"
        except ValueError:
            if not _HOST.match(name):
                raise ValueError(f"host {name!r}: not an IP address or a DNS name") from None
            entry = f"DNS:{name}"
        if entry not in seen:
            seen.append(entry)
    return ", ".join(seen)


def _check_name(what: str, value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"{what} {value!r}: use letters, digits, '.', '_' and '-'")
    return value


class CertificateAuthority:
    """A private CA for one cluster's routes or one hub's leaf nodes (openssl CLI).

    ``directory`` holds ``ca.pem`` and ``ca-key.pem``; an existing pair there is
    reused, otherwise a new one is made (EC P-256). :meth:`issue` writes
    ``NAME.pem`` and ``NAME-key.pem``. Private keys are readable by their owner only.
    Only certificates of *this* CA are accepted by the listeners configured with
    it, so a server that never got one cannot join.
    """

    def __init__(self, directory: str | Path, *, name: str = "deadlift CA", days: int = 3650):
        if not _CA_NAME.match(name):
            raise ValueError(f"CA name {name!r}: use letters, digits, spaces, '.', '_' and '-'")
        self.directory = Path(directory)
        self.cert = self.directory / "ca.pem"
        self.key = self.directory / "ca-key.pem"
        if not (self.cert.is_file() and self.key.is_file()):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(
                self.key, _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout").decode()
            )
            config = self._config(
                name,
                "[v3_ca]\nbasicConstraints = critical, CA:TRUE, pathlen:0\n"
                "keyUsage = critical, keyCertSign, cRLSign\nsubjectKeyIdentifier = hash\n",
            )
            try:
                pem = _openssl(
                    "req",
                    "-new",
                    "-x509",
                    "-config",
                    str(config),
                    "-extensions",
                    "v3_ca",
                    "-key",
                    str(self.key),
                    "-days",
                    str(days),
                    "-sha256",
                )
            finally:
                config.unlink()
            self.cert.write_bytes(pem)

    def _config(self, common_name: str, extensions: str) -> Path:
        text = (
            f"[req]\ndistinguished_name = dn\nprompt = no\n[dn]\nCN = {common_name}\n{extensions}"
        )
        fd, name = tempfile.mkstemp(dir=self.directory, suffix=".cnf")
        with os.fdopen(fd, "w") as out:
            out.write(text)
        return Path(name)

    def issue(
        self,
        name: str,
        *,
        hosts: Iterable[str] = (),
        common_name: str | None = None,
        days: int = 825,
    ) -> TlsFiles:
        """A certificate for ``name`` (server and client use), valid for ``hosts``.

        Its subject alternative names are ``name`` and every host (IP addresses as
        such); its subject is ``CN=<common_name or name>``.
        """
        _check_name("certificate name", name)
        common_name = _check_name("common name", common_name or name)
        alt_names = _subject_alt_names([name, *hosts])
        key = self.directory / f"{name}-key.pem"
        cert = self.directory / f"{name}.pem"
        write_private(key, _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout").decode())
        config = self._config(
            common_name,
            "[ext]\nbasicConstraints = critical, CA:FALSE\n"
            "keyUsage = critical, digitalSignature, keyEncipherment\n"
            "extendedKeyUsage = serverAuth, clientAuth\n"
            f"subjectAltName = {alt_names}\n",
        )
        try:
            request = _openssl("req", "-new", "-key", str(key), "-config", str(config))
            pem = _openssl(
                "x509",
                "-req",
                "-CA",
                str(self.cert),
                "-CAkey",
                str(self.key),
                "-set_serial",
                str(secrets.randbits(62) | 1 << 62),
                "-days",
                str(days),
                "-sha256",
                "-extfile",
                str(config),
                "-extensions",
                "ext",
                stdin=request,
            )
        finally:
            config.unlink()
        cert.write_bytes(pem)
        return TlsFiles(cert=cert, key=key, ca=self.cert)
