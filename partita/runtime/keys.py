"""CURVE keys and authorization for every partita socket (ZeroMQ's Curve25519 security).

Keys are the standard ZeroMQ certificate files (`zmq.auth.create_certificates`): ``NAME.key`` holds
the public key, ``NAME.key_secret`` the public and secret keys. In memory a key is its 40-char z85
encoding as bytes.

A server socket (`apply_server`) encrypts and accepts a connection only from the public keys it is
given: each such socket gets its own ZAP domain, checked against its own key set by one ZAP handler
thread per zmq.Context (`zmq.auth.thread.ThreadAuthenticator`). The key set can be replaced while
the socket runs (`set_authorized`), e.g. when a deploy names new peers. A refused client never
completes its handshake, so nothing it sends arrives. `ZAP_ENFORCE_DOMAIN` is set, so a socket whose
handler is gone refuses everyone rather than accepting everyone.

Call `stop_auth(context)` before `context.term()`: the handler thread holds sockets of that context.

Insecure mode is an explicit argument (`insecure=True`), never a fallback: with no secret key and
no ``insecure=True`` these functions raise `AuthError`.
"""

from __future__ import annotations

import itertools
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from partita.errors import AuthError

log = logging.getLogger(__name__)

# A secret given as a path to a .key_secret file, or as an in-memory (public, secret) z85 pair.
SecretKey = str | os.PathLike | tuple[bytes, bytes]
# Authorized clients: public keys (z85 bytes), or a path to a .key file or a directory of them.
Authorized = str | os.PathLike | Iterable[bytes]

_domain_ids = itertools.count(1)
_gates: dict[int, _Gate] = {}
_gates_lock = threading.Lock()
# An insecure run opens many sockets; the user chose it once, so it is said once per process.
_insecure_said = threading.Event()


def new_keypair(dir: str | os.PathLike, name: str, *, overwrite: bool = False) -> tuple[Path, Path]:
    """Write DIR/NAME.key and DIR/NAME.key_secret (secret readable by the owner only); return both paths.

    Refuses to replace an existing pair unless `overwrite` (a lost secret key cannot be recovered).
    """
    if not name or os.sep in name or name.startswith("."):
        raise AuthError(f"key name {name!r} must be a plain file name such as 'coordinator' or 'pi-a'")
    directory = Path(dir)
    public, secret = directory / f"{name}.key", directory / f"{name}.key_secret"
    if not overwrite and (public.exists() or secret.exists()):
        raise AuthError(
            f"{public} or {secret} already exists; pick another name or delete the old pair first"
        )
    directory.mkdir(parents=True, exist_ok=True)
    public_path, secret_path = zmq.auth.create_certificates(str(directory), name)
    os.chmod(secret_path, 0o600)
    return Path(public_path), Path(secret_path)


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a .key_secret file; AuthError if missing, malformed or public-only."""
    public, secret = _load_certificate(path)
    if secret is None:
        raise AuthError(f"{path} holds only a public key; pass the matching .key_secret file")
    return public, secret


def load_public_keys(file_or_dir: str | os.PathLike) -> list[bytes]:
    """Public keys from one .key (or .key_secret) file, or from every *.key file in a directory."""
    path = Path(file_or_dir)
    if path.is_dir():
        files = sorted(path.glob("*.key"))
        if not files:
            raise AuthError(f"no *.key files in {path}; create some with `partita keys new {path} NAME`")
        return [_load_certificate(f)[0] for f in files]
    return [_load_certificate(path)[0]]


def ephemeral_keypair() -> tuple[bytes, bytes]:
    """A fresh in-memory (public, secret) pair, e.g. for the throwaway keys of a LocalCluster."""
    return zmq.curve_keypair()


def apply_server(
    socket: zmq.Socket,
    secret_file: SecretKey | None,
    authorized: Authorized | None,
    *,
    insecure: bool = False,
) -> str | None:
    """Make `socket` a CURVE server that accepts only `authorized` clients; call before bind().

    Returns the socket's ZAP domain (None in insecure mode). With `insecure=True` the socket is left
    plain (no encryption, anyone may connect) and a warning is logged.
    """
    if _insecure_choice(secret_file, insecure, "server"):
        return None
    keys = _key_set(authorized)
    public, secret = _secret_pair(secret_file)
    domain = f"partita-{next(_domain_ids)}"
    _gate(socket.context).register(domain, keys)
    socket.zap_domain = domain.encode()
    socket.zap_enforce_domain = True
    socket.curve_publickey = public
    socket.curve_secretkey = secret
    socket.curve_server = True
    return domain


def set_authorized(socket: zmq.Socket, authorized: Authorized) -> None:
    """Replace the client keys a server socket accepts; applies to connections made from now on."""
    domain = _domain_of(socket)
    _gate(socket.context).register(domain, _key_set(authorized))


def auth_stats(socket: zmq.Socket) -> dict[str, int]:
    """How many handshakes this server socket accepted and refused: {"accepted": n, "refused": n}."""
    return _gate(socket.context).stats(_domain_of(socket))


def apply_client(
    socket: zmq.Socket,
    secret_file: SecretKey | None,
    server_public: bytes | str | os.PathLike | None,
    *,
    insecure: bool = False,
) -> None:
    """Make `socket` a CURVE client of the server with public key `server_public` (z85 bytes or a .key path).

    Call before connect(). A wrong server key means the handshake never completes (no message goes
    through), which is what protects against a server impostor.
    """
    if _insecure_choice(secret_file, insecure, "client"):
        return
    if server_public is None:
        raise AuthError("a CURVE client needs the server's public key (its .key file)")
    server_key = (
        _check_key(server_public) if isinstance(server_public, bytes) else _load_certificate(server_public)[0]
    )
    public, secret = _secret_pair(secret_file)
    socket.curve_serverkey = server_key
    socket.curve_publickey = public
    socket.curve_secretkey = secret


def peer_key(frame: zmq.Frame) -> bytes | None:
    """The z85 public key of the authenticated peer that sent `frame` (received with copy=False).

    None when the socket is insecure. Lets one server socket tell which authorized key sent a message.
    """
    try:
        user = frame.get("User-Id")
    except zmq.ZMQError:
        # libzmq raises EINVAL when the message carries no User-Id property (no ZAP handshake).
        return None
    return str(user).encode() if user else None


def stop_auth(context: zmq.Context) -> None:
    """Stop the ZAP handler thread of `context` (if any); call before context.term(). Idempotent."""
    with _gates_lock:
        gate = _gates.pop(id(context), None)
    if gate is not None:
        gate.stop()


class _Gate:
    """One ZAP handler per context; each server socket's domain maps to its own authorized key set."""

    def __init__(self, context: zmq.Context) -> None:
        self._lock = threading.Lock()
        self._keys: dict[str, frozenset[bytes]] = {}
        self._counts: dict[str, dict[str, int]] = {}
        self._auth = ThreadAuthenticator(context, log=log)
        self._auth.start()

    def register(self, domain: str, keys: frozenset[bytes]) -> None:
        with self._lock:
            self._keys[domain] = keys
            self._counts.setdefault(domain, {"accepted": 0, "refused": 0})
        self._auth.configure_curve_callback(domain=domain, credentials_provider=self)

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP thread for every CURVE handshake on one of our domains."""
        with self._lock:
            allowed = key in self._keys.get(domain, ())
            counts = self._counts.setdefault(domain, {"accepted": 0, "refused": 0})
            counts["accepted" if allowed else "refused"] += 1
        if not allowed:
            log.warning("refused a CURVE client with unauthorized key %s (domain %s)", key.decode(), domain)
        return allowed

    def stats(self, domain: str) -> dict[str, int]:
        with self._lock:
            return dict(self._counts.get(domain, {"accepted": 0, "refused": 0}))

    def stop(self) -> None:
        self._auth.stop()


def _gate(context: zmq.Context) -> _Gate:
    with _gates_lock:
        gate = _gates.get(id(context))
        if gate is None:
            gate = _gates[id(context)] = _Gate(context)
        return gate


def _domain_of(socket: zmq.Socket) -> str:
    raw = socket.zap_domain
    domain = raw.decode() if isinstance(raw, bytes) else str(raw)
    if not domain or not domain.startswith("partita-"):
        raise AuthError("this socket was not set up with apply_server(); it has no authorized key set")
    return domain


def insecure_already_reported() -> None:
    """Say that the user was told about insecure sockets (the CLI prints its own warning line)."""
    _insecure_said.set()


def _insecure_choice(secret_file: SecretKey | None, insecure: bool, role: str) -> bool:
    if insecure:
        if secret_file is not None:
            raise AuthError(f"both a secret key and insecure=True given for a {role} socket; choose one")
        if not _insecure_said.is_set():
            _insecure_said.set()
            log.warning("insecure sockets: no encryption, no authentication (chosen explicitly; said once)")
        return True
    if secret_file is None:
        raise AuthError(
            f"no secret key for this {role} socket; pass one (--secret-key FILE) or choose --insecure explicitly"
        )
    return False


def _secret_pair(secret: SecretKey | None) -> tuple[bytes, bytes]:
    if secret is None:  # _insecure_choice refused this already; kept for the type checker
        raise AuthError("no secret key for this socket")
    if isinstance(secret, tuple):
        if len(secret) != 2:
            raise AuthError("an in-memory secret key is a (public, secret) pair of z85 bytes")
        return _check_key(secret[0]), _check_key(secret[1])
    return load_secret(secret)


def _key_set(authorized: Authorized | None) -> frozenset[bytes]:
    if authorized is None:
        raise AuthError("no authorized keys given; pass the public key files of the peers allowed to connect")
    if isinstance(authorized, str | os.PathLike):
        keys = load_public_keys(authorized)
    else:
        keys = [_check_key(k) for k in authorized]
    if not keys:
        raise AuthError("the authorized key list is empty; nobody could connect")
    return frozenset(keys)


def _check_key(key: object) -> bytes:
    if not isinstance(key, bytes) or len(key) != 40:
        raise AuthError(f"a CURVE key is 40 z85 characters as bytes, got {key!r:.60}")
    try:
        z85.decode(key)
    except (ValueError, KeyError, IndexError):
        # z85.decode signals an invalid character in different ways across pyzmq versions.
        raise AuthError(f"{key!r} is not a z85-encoded CURVE key") from None
    return key


def _load_certificate(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    path = Path(path)
    if not path.is_file():
        raise AuthError(f"key file {path} does not exist; create one with `partita keys new DIR NAME`")
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError, UnicodeDecodeError) as exc:
        # load_certificate raises ValueError for a file without a public-key line.
        raise AuthError(f"{path} is not a ZeroMQ certificate file: {exc}") from None
    _check_key(public)
    if secret is not None:
        _check_key(secret)
    return public, secret
