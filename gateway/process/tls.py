"""TLS on the gRPC port: server credentials from PEM files, optionally requiring client
certificates (mTLS), re-read when the files change so certificates rotate without restart."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import grpc

from gateway.settings import SettingsError

log = logging.getLogger(__name__)


class TlsError(SettingsError):
    """The certificate files cannot be read at start-up."""


Signature = tuple[tuple[int, int, int], ...]


class CertificateFiles:
    """The PEM files of the server's identity (and the CAs clients must chain to); gRPC
    calls ``fetch`` at each new handshake, which re-reads the files only when they changed.
    A half-written or broken new file is logged and the previous certificates stay."""

    def __init__(self, cert: Path, key: Path, client_ca: Path | None = None) -> None:
        self.cert, self.key, self.client_ca = cert, key, client_ca
        self._signature = self._stat()
        try:
            self.initial = self._config()
        except (OSError, ValueError) as exc:
            raise TlsError(f"cannot load TLS files: {exc}") from exc
        self.reloads = 0

    def _paths(self) -> tuple[Path, ...]:
        return (self.cert, self.key) + ((self.client_ca,) if self.client_ca else ())

    def _stat(self) -> Signature:
        out = []
        for path in self._paths():
            try:
                st = os.stat(path)
                out.append((st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:
                out.append((0, 0, 0))
        return tuple(out)

    def _config(self) -> grpc.ServerCertificateConfiguration:
        cert, key = self.cert.read_bytes(), self.key.read_bytes()
        if b"-----BEGIN" not in cert or b"-----BEGIN" not in key:
            raise ValueError("certificate and key must be PEM")
        roots = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_certificate_configuration([(key, cert)], roots)

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """The new configuration when the files changed since the last look, else None."""
        signature = self._stat()
        if signature == self._signature:
            return None
        try:
            config = self._config()
        except (OSError, ValueError) as exc:
            log.error("keeping the previous TLS certificates: %s", exc)
            return None
        self._signature = signature
        self.reloads += 1
        log.info("TLS certificates reloaded from %s", self.cert)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            # gRPC documents None from the fetcher as "unchanged"; the stub says otherwise.
            self.initial, self.fetch,  # type: ignore[arg-type]
            require_client_authentication=self.client_ca is not None,
        )
