"""The coordinator's side of a worker's control socket: one request, one reply, with a timeout.

A `ControlClient` is safe to share between threads (a lock serialises calls). Each request
carries an id; a reply with another id (late, after an earlier timeout) is dropped, so a slow
worker can never hand one call another call's answer.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Mapping, Sequence

import torch
import zmq

from partita.errors import WireError, WorkerError
from partita.runtime.handle import Keypair, WorkerEndpoint
from partita.runtime.keys import apply_client
from partita.runtime.protocol import REPLY_KINDS, Command, Reply, reply_from
from partita.runtime.wire import Limits, Message, decode, encode

# How often a waiting call looks whether the worker's process is still there (when it can know).
LIVENESS_CHECK_S = 0.25


class ControlClient:
    """Calls on one worker's control socket. `timeout_s` bounds each call unless a call says otherwise.

    `exited`, when given, tells whether the worker's process has ended (its exit code) or not
    (None); a call waiting on a worker this machine started then fails as soon as the process
    is gone, instead of at the end of its timeout.
    """

    def __init__(
        self, context: zmq.Context, endpoint: WorkerEndpoint, keys: Keypair | None, *, timeout_s: float = 30.0,
        exited: Callable[[], int | None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._exited = exited
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._socket = context.socket(zmq.DEALER)
        self._socket.linger = 0
        plain = keys is None or endpoint.public_key is None
        secret = None if keys is None or plain else (keys.public, keys.secret)
        apply_client(self._socket, secret, None if plain else endpoint.public_key, insecure=plain)
        self._socket.connect(endpoint.control)

    def call(
        self,
        kind: str,
        header: Mapping | None = None,
        tensors: Sequence[torch.Tensor] = (),
        *,
        timeout_s: float | None = None,
    ) -> Message:
        """Send one command and return its reply; WorkerError if refused, failed or not answered in time."""
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        name = self.endpoint.name
        with self._lock:
            tag = next(self._ids)
            # Not a blocking send: a DEALER whose handshake was refused has no pipe, and would wait forever.
            if not self._wait(timeout_s, zmq.POLLOUT, kind):
                raise WorkerError(
                    f"worker {name} at {self.endpoint.control} did not accept {kind!r} within {timeout_s:g} s; "
                    "is it running, and was it given this coordinator's public key?"
                )
            self._socket.send_multipart(encode(kind, {**(header or {}), "id": tag}, tensors), copy=False)
            while True:
                if not self._wait(timeout_s, zmq.POLLIN, kind):
                    raise WorkerError(
                        f"worker {name} at {self.endpoint.control} did not answer {kind!r} within {timeout_s:g} s; "
                        "is it running, and was it given this coordinator's public key?"
                    )
                try:
                    reply = decode(self._socket.recv_multipart(copy=False), limits=Limits(), kinds=REPLY_KINDS)
                except WireError as exc:
                    raise WorkerError(f"worker {name} sent a malformed reply to {kind!r}: {exc}") from None
                # A reply without an id is the worker refusing a message it could not read: ours,
                # since calls on this client are serialised.
                if reply.header.get("id") == tag or (reply.kind == "error" and reply.header.get("id") is None):
                    break
        if reply.kind == "error":
            raise WorkerError(f"worker {name} refused {kind!r}: {reply.header.get('reason')}")
        return reply

    def _wait(self, timeout_s: float, event: int, kind: str) -> bool:
        """Poll the socket for `event` up to `timeout_s`; WorkerError as soon as the worker's process is gone."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            step = left if self._exited is None else min(left, LIVENESS_CHECK_S)
            if self._socket.poll(max(step, 0.0) * 1000, event):
                return True
            code = self._exited() if self._exited is not None else None
            if code is not None:
                raise WorkerError(
                    f"worker {self.endpoint.name}'s process exited (code {code}) while {kind!r} waited for it"
                )
            if time.monotonic() >= deadline:
                return False

    def send(self, command: Command, *, timeout_s: float | None = None) -> Reply:
        """Send a typed command (`partita.runtime.protocol`) and return its typed, checked reply."""
        reply = self.call(command.KIND, command.header(), command.tensors(), timeout_s=timeout_s)
        try:
            return reply_from(reply)
        except WorkerError as exc:
            raise WorkerError(f"worker {self.endpoint.name} sent a malformed reply to {command.KIND!r}: {exc}") from None

    def close(self) -> None:
        with self._lock:
            self._socket.close(linger=0)
