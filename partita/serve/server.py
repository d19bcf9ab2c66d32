"""One served deployment: the pipeline, its batcher, state and metrics, behind uvicorn.

`Service` holds what the HTTP handlers use; `InferenceServer` runs uvicorn over it, either in the
calling (main) thread until SIGINT or SIGTERM (`run`, what `partita serve` does) or in a thread of
its own (`start` / `stop`, for tests, benchmarks and notebooks).

Stopping drains: the listening socket closes, every request already read is answered (uvicorn
waits for open connections; event streams end at once), then the batcher sends what waits and
the pipeline is closed. The cluster is not: whoever opened it stops the workers it started.
"""

from __future__ import annotations

import contextlib
import ipaddress
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import torch

from partita.errors import ServeError
from partita.serve.batcher import DynamicBatcher
from partita.serve.metrics import ServeMetrics
from partita.serve.signature import ModelSignature
from partita.serve.state import ServeState

MIB = 1 << 20


@dataclass(frozen=True)
class ServeOptions:
    """How to serve. `max_rows`: rows per batch (--max-batch; 1 turns batching off). `window_s`: how
    long a batch waits for more requests (--batch-window-ms / 1000). `api_key` None: no key needed.
    `port` 0: any free port. `max_body_bytes`: the largest infer body taken (400 above it).
    """

    name: str
    host: str = "127.0.0.1"
    port: int = 8000
    max_rows: int = 8
    window_s: float = 0.002
    api_key: str | None = None
    max_body_bytes: int = 64 * MIB
    poll_s: float = 1.0

    def __post_init__(self) -> None:
        if self.max_rows < 1:
            raise ServeError(f"--max-batch must be at least 1, got {self.max_rows}")
        if self.window_s < 0:
            raise ServeError(f"--batch-window-ms must be >= 0, got {self.window_s * 1e3:g}")
        if self.max_body_bytes < 1:
            raise ServeError(f"--max-body-bytes must be at least 1, got {self.max_body_bytes}")
        if not self.name or "/" in self.name:
            raise ServeError(f"--name must be a non-empty name without '/', got {self.name!r}")


def check_bind(host: str, api_key: str | None, no_auth: bool) -> None:
    """Binding beyond loopback needs --api-key or an explicit --no-auth (ServeError otherwise)."""
    if api_key is not None and no_auth:
        raise ServeError("--api-key and --no-auth contradict each other; give one")
    if api_key is not None and not api_key.strip():
        raise ServeError("--api-key is empty; give a secret token, or --no-auth")
    if is_loopback(host) or api_key is not None or no_auth:
        return
    raise ServeError(f"--host {host} is reachable beyond this machine; give --api-key KEY (clients send "
                     "'Authorization: Bearer KEY'), or --no-auth to serve it open on purpose")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def pipeline_submit(pipe: Any, signature: ModelSignature) -> Callable[[tuple[torch.Tensor, ...]], Future]:
    """The batcher's `submit`: flat input tensors in, a Future of the flat outputs out."""

    def submit(flat: tuple[torch.Tensor, ...]) -> Future:
        outer: Future = Future()

        def done(inner: Future) -> None:
            error = inner.exception()
            if error is not None:
                outer.set_exception(error)
                return
            try:
                outer.set_result(signature.flat_outputs(inner.result()))
            except Exception as exc:  # noqa: BLE001 - the waiting request gets the error, not the callback thread
                outer.set_exception(exc)

        pipe.submit(*signature.args(flat)).add_done_callback(done)
        return outer

    return submit


class Service:
    """What the handlers use: the pipeline behind a batcher, the state and metrics, the options."""

    def __init__(self, pipe: Any, signature: ModelSignature, cluster_spec: Any, options: ServeOptions, *,
                 on_plan_change: Callable[[str], None] | None = None) -> None:
        self.pipe = pipe
        self.signature = signature
        self.options = options
        self.draining = False
        self.metrics = ServeMetrics(options.max_rows)
        self.state = ServeState(model=options.name, pipe=pipe, cluster_spec=cluster_spec, metrics=self.metrics,
                                max_rows=options.max_rows, window_s=options.window_s, poll_s=options.poll_s,
                                on_plan_change=on_plan_change)
        self.batcher = DynamicBatcher(pipeline_submit(pipe, signature), max_rows=options.max_rows,
                                      window_s=options.window_s, max_batches=self._max_batches,
                                      on_batch=self._on_batch)
        self._closed = False
        self.state.start()

    @property
    def ready(self) -> bool:
        return not self.draining and self.state.halted is None

    def _max_batches(self) -> int:
        """Batches in the pipeline at once: one per device of the current plan and one more, so every
        stage has work while later requests wait here to form full batches (more in flight would
        only queue at the stages, and split the same load into smaller batches)."""
        return len(self.pipe.plan.devices) + 1

    def _on_batch(self, rows: int, requests: int, wait_s: float) -> None:
        self.metrics.batch_rows.observe(rows)
        self.metrics.batch_requests.observe(requests)
        self.metrics.batch_wait.observe(wait_s)

    def shutdown(self) -> None:
        """Answer what was accepted, then close the pipeline. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.draining = True
        self.batcher.close()
        self.state.stop()
        self.pipe.close()


class InferenceServer:
    """uvicorn over a `Service`. `url` is where it listens (the port is known before it starts)."""

    def __init__(self, service: Service) -> None:
        import uvicorn

        from partita.serve.app import create_app

        self.service = service
        options = service.options
        self._socket = _bind(options.host, options.port)
        self.port = self._socket.getsockname()[1]
        host = f"[{options.host}]" if ":" in options.host else options.host
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(create_app(service), log_level="warning", access_log=False,
                                timeout_keep_alive=30, lifespan="on")
        self._server = _Uvicorn(config, on_exit=self._begin_drain)
        self._thread: threading.Thread | None = None

    def run(self) -> None:
        """Serve in this thread until SIGINT or SIGTERM (or `stop()`), then drain (see the module docstring)."""
        self._server.run(sockets=[self._socket])
        self.service.shutdown()  # normally done by the lifespan already; a failed start still closes

    def start(self, timeout_s: float = 30.0) -> InferenceServer:
        """Serve from a thread of its own; returns once it answers."""
        self._thread = threading.Thread(target=self.run, name="partita-serve-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise ServeError(f"the HTTP server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def stop(self, timeout_s: float = 60.0) -> None:
        """Drain and stop (what SIGTERM does), then wait for the thread."""
        self._begin_drain()
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout_s)

    def __enter__(self) -> InferenceServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _begin_drain(self) -> None:
        self.service.draining = True  # event streams end, readiness turns false; infer keeps answering


class _Uvicorn:
    """uvicorn's Server, with signals that drain and return (uvicorn re-raises them after shutdown,
    which would kill the process before the workers it started are stopped)."""

    def __new__(cls, config: Any, *, on_exit: Callable[[], None]) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            @contextlib.contextmanager
            def capture_signals(self) -> Iterator[None]:
                if threading.current_thread() is not threading.main_thread():
                    yield
                    return
                originals = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
                try:
                    yield
                finally:
                    for sig, handler in originals.items():
                        signal.signal(sig, handler)

            def handle_exit(self, sig: int, frame: Any) -> None:
                on_exit()
                super().handle_exit(sig, frame)

        return Server(config)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ServeError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; choose another --port or --host") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def deploy_for_serving(module: Any, input_shapes: list[tuple[int, ...]], cluster: Any, *, max_rows: int,
                       seed: int = 0, **deploy_options: Any) -> tuple[Any, ModelSignature]:
    """Deploy `module` for batches of `max_rows` rows; return the pipeline and the model's signature.

    `input_shapes` are one request's shapes (dimension 0 is the batch; its size is replaced by
    `max_rows`): the planner profiles, and plans for, the batch the batcher produces. The model is
    captured with a dynamic batch dimension; a model that fixes its batch is refused (ServeError).
    `deploy_options` go to `partita.deploy` (objective, planner, codec, supervise, ...).
    """
    from partita.runtime.coordinator import deploy
    from partita.serve.signature import read_signature

    if any(len(s) == 0 for s in input_shapes):
        raise ServeError("every --input-shape needs a batch dimension first, e.g. 1,3,224,224")
    generator = torch.Generator().manual_seed(seed)
    example = tuple(torch.randn((max_rows, *s[1:]), generator=generator) for s in input_shapes)
    signature = read_signature(module, example)
    pipe = deploy(module, example, cluster, **deploy_options)
    if not getattr(pipe.graph, "dynamic_batch", True):
        pipe.close()
        raise ServeError("the model fixes its batch size (torch.export could not keep dimension 0 dynamic); "
                         "partita serve batches requests and needs a model that runs at any batch size")
    return pipe, signature
