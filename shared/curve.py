"""CURVE for ZeroMQ across hosts: the cluster's key pair on disk, and the rule that no socket binds
beyond loopback without it.

One key pair per cluster (`runwire keys` writes it; every host gets a copy, like the HTTP token):
a binding socket is a CURVE server with the secret key; a connecting socket verifies the server by
the public key and presents the same pair; `CurveAuthenticator` (ZAP) makes servers accept only
clients presenting it, so holding the secret is what lets a host in. The files use libzmq's ZPL
certificate format (what `zmq.auth.load_certificate` reads), the secret one with mode 0600.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from .config import Settings
from .errors import BindError, ConfigError

log = logging.getLogger(__name__)

PUBLIC_NAME = "runwire.key"
SECRET_NAME = "runwire.key_secret"
ZAP_DOMAIN = "runwire"
_Z85_KEY = re.compile(rb"^[0-9A-Za-z.\-:+=^!/*?&<>()\[\]{}@%$#]{40}$")


@dataclass(frozen=True, repr=False)
class CurveKeys:
    """The cluster's key pair, Z85-encoded (40 bytes each). repr hides the secret."""

    public: bytes
    secret: bytes

    def __repr__(self) -> str:
        return f"CurveKeys(public={self.public.decode()!r})"


def write_keypair(out_dir: Path, *, overwrite: bool = False) -> tuple[Path, Path]:
    """A fresh pair as `runwire.key` (public) and `runwire.key_secret` (both keys), mode 0600."""
    public, secret = zmq.curve_keypair()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = out_dir / PUBLIC_NAME, out_dir / SECRET_NAME
    if not overwrite:
        for p in paths:
            if p.exists():
                raise ConfigError(f"{p}: already exists; a new pair would lock out every host holding the old "
                                  "one (remove it first, or choose another --out)")
    _write_private(paths[0], _zpl("Public", public))
    _write_private(paths[1], _zpl("Secret", public, secret))
    return paths


def _zpl(kind: str, public: bytes, secret: bytes | None = None) -> bytes:
    lines = [f"#   runwire: ZeroMQ CURVE {kind} Certificate (ZPL, as zmq.auth reads it)", "", "metadata", "curve",
             f'    public-key = "{public.decode()}"']
    if secret is not None:
        lines.append(f'    secret-key = "{secret.decode()}"')
    return ("\n".join(lines) + "\n").encode()


def _write_private(path: Path, data: bytes) -> None:
    # created 0600 from the start (no window where another user could read the secret), replaced whole
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # the umask cannot widen it, an older tmp file keeps no other mode
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def load_keys(settings: Settings) -> CurveKeys | None:
    """The configured pair, checked (readable, well-formed, the public key belongs to the secret);
    None without `[cluster.curve]`."""
    cluster = settings.config.cluster
    if cluster is None or cluster.curve is None:
        return None
    base = settings.path.parent
    public_path = (base / cluster.curve.public_file).resolve()
    secret_path = (base / cluster.curve.secret_file).resolve()
    public = _read_key(settings, "cluster.curve.public_file", public_path, secret=False)
    secret = _read_key(settings, "cluster.curve.secret_file", secret_path, secret=True)
    if not hmac.compare_digest(zmq.curve_public(secret), public):
        raise ConfigError(f"{settings.path}: key `cluster.curve.public_file`: {public_path} is not the public key "
                          f"of {secret_path} (copied from another pair?)")
    return CurveKeys(public, secret)


def _read_key(settings: Settings, key: str, path: Path, *, secret: bool) -> bytes:
    try:
        public, secret_key = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{settings.path}: key `{key}`: cannot read a CURVE key from {path}: {e}") from e
    value = secret_key if secret else public
    if not value or not _Z85_KEY.match(value):
        what = "secret-key" if secret else "public-key"
        raise ConfigError(f"{settings.path}: key `{key}`: {path} has no valid {what} "
                          "(write a pair with `runwire keys`)")
    if secret and path.stat().st_mode & 0o077:
        raise ConfigError(f"{settings.path}: key `{key}`: {path} is readable by other users: chmod 600 it")
    return value


def is_loopback_endpoint(endpoint: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on a loopback address; any other transport or host (a
    name, an interface, `*`, 0.0.0.0) may be reached from elsewhere."""
    transport, sep, rest = endpoint.partition("://")
    if not sep:
        return False
    if transport in ("ipc", "inproc"):
        return True
    if transport != "tcp":
        return False
    host = rest.rpartition(":")[0]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_unsecured(endpoint: str, key: str, keys: CurveKeys | None, config: object = None,
                     what: str = "socket") -> None:
    """The contract's rule: no ZeroMQ socket binds beyond loopback without CURVE (BindError naming
    the config key, the endpoint and the way out)."""
    if keys is None and not is_loopback_endpoint(endpoint):
        raise BindError(key, endpoint, "not a loopback address, and no CURVE keys are in use: ZeroMQ beyond "
                        "this host must be encrypted (a pair from `runwire keys`, named in [cluster.curve]), "
                        "or bind 127.0.0.1", config, what)


def bind_secured(sock: zmq.Socket[Any], endpoint: str, key: str, keys: CurveKeys | None,
                 config: object = None, what: str = "socket") -> None:
    """Bind `sock` as the config key `key` says: refused beyond loopback without CURVE keys; with
    keys, a CURVE server (set before the bind: options apply to the connections made after)."""
    refuse_unsecured(endpoint, key, keys, config, what)
    if keys is not None:
        sock.curve_server = True
        sock.curve_secretkey = keys.secret
        sock.curve_publickey = keys.public
        sock.zap_domain = ZAP_DOMAIN.encode()
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as e:
        raise BindError(key, endpoint, str(e), config, what) from e


def secure_client(sock: zmq.Socket[Any], keys: CurveKeys | None) -> None:
    """Before connect: with keys, verify the server by the cluster's public key and present the pair."""
    if keys is None:
        return
    sock.curve_serverkey = keys.public
    sock.curve_publickey = keys.public
    sock.curve_secretkey = keys.secret


class CurveAuthenticator:
    """ZAP for one context: its CURVE servers accept only clients presenting the cluster's public
    key. A context manager owning pyzmq's authenticator thread (started on enter, joined on exit);
    without it libzmq lets any client with any key pair connect to a CURVE server."""

    def __init__(self, ctx: zmq.Context[Any], keys: CurveKeys) -> None:
        self._auth = ThreadAuthenticator(ctx, log=log)
        self._keys = keys
        self.refused = 0

    def callback(self, domain: str, client_key: bytes) -> bool:  # pyzmq's credentials-provider hook
        ok = hmac.compare_digest(client_key, self._keys.public)
        if not ok:
            self.refused += 1
            log.warning("CURVE: refused a client presenting key %s (not the cluster's)", client_key[:8].decode() + "...")
        return ok

    def __enter__(self) -> Self:
        self._auth.start()
        # pyzmq looks the provider up by the exact domain the server socket names (no wildcard)
        self._auth.configure_curve_callback(domain=ZAP_DOMAIN, credentials_provider=self)
        return self

    def __exit__(self, *exc: object) -> None:
        self._auth.stop()
