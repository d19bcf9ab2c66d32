"""`partita serve MODEL --cluster FILE`: deploy a model and serve it over HTTP until Ctrl-C or SIGTERM.

It deploys like `partita run` (devices with an `address` are real workers, the others are
emulated here), for batches of --max-batch rows, then serves the Open Inference Protocol v2
(KServe v2 REST) with dynamic batching, Prometheus metrics and a live dashboard. A signal drains:
requests in flight are answered, then the workers this command started are stopped (workers of
real devices stay up). See docs/serve.md.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def serve(
    model: Annotated[str, typer.Argument(help="Model reference: torchvision:NAME, package.module:factory, file.py:factory, model.pt2")],
    cluster: Annotated[Path, typer.Option("--cluster", help="Cluster file (YAML).")],
    input_shape: Annotated[
        list[str] | None, typer.Option("--input-shape", help="One request's input shape, e.g. 1,3,224,224 (';' between inputs).")
    ] = None,
    name: Annotated[str | None, typer.Option("--name", help="The model's name in the API (default: from MODEL).")] = None,
    host: Annotated[str, typer.Option("--host", help="Address to listen on (beyond loopback needs --api-key or --no-auth).")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="Port to listen on (0: any free port).")] = 8000,
    objective: Annotated[str, typer.Option("--objective", help="throughput or latency.")] = "throughput",
    planner: Annotated[str, typer.Option("--planner", help="optimal, single, even, memory or flops.")] = "optimal",
    codec: Annotated[str, typer.Option("--codec", help="Activations on the wire: none, lz4, fp16 or int8.")] = "none",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="Rows per batch (1: no batching); the plan is made for it.")] = 8,
    batch_window_ms: Annotated[
        float, typer.Option("--batch-window-ms", min=0.0, help="How long a batch waits for more requests (ms).")
    ] = 2.0,
    api_key: Annotated[str | None, typer.Option("--api-key", help="Clients must send 'Authorization: Bearer KEY'.")] = None,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="Serve beyond loopback without a key, on purpose.")] = False,
    secret_key: Annotated[
        Path | None, typer.Option("--secret-key", help="The coordinator's NAME.key_secret (for workers with addresses).")
    ] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="Talk to --insecure workers (no encryption).")] = False,
    max_body_bytes: Annotated[
        int, typer.Option("--max-body-bytes", min=1, help="The largest infer request body taken (bytes).")
    ] = 64 << 20,
    detection: Annotated[
        float, typer.Option("--detection", help="Seconds of silence after which a worker is failed and re-planned around.")
    ] = 2.0,
    standby: Annotated[
        bool, typer.Option("--standby", help="Pre-ship the stages each failure plan needs, so a failover ships nothing.")
    ] = False,
) -> None:
    """Serve MODEL over HTTP (Open Inference Protocol v2) on the cluster, with dynamic batching and a dashboard.

    An hf:PATH model (a causal LM) is served OpenAI-style instead: POST /v1/completions and
    /v1/chat/completions, with server-sent-events streaming.
    """
    require_serve_extra()
    from rich.console import Console

    from partita.commands.inspect import parse_input_shapes
    from partita.model import load_ref
    from partita.runtime import keys
    from partita.runtime.connect import open_cluster
    from partita.runtime.supervisor import Supervision
    from partita.serve.server import InferenceServer, ServeOptions, Service, check_bind, deploy_for_serving
    from partita.serve.state import plan_line

    console = Console(stderr=True)
    check_bind(host, api_key, no_auth)
    if not detection > 0:
        raise typer.BadParameter(f"--detection must be > 0 seconds, got {detection!r}", param_hint="--detection")
    options = ServeOptions(name=name or default_name(model), host=host, port=port, max_rows=max_batch,
                           window_s=batch_window_ms / 1e3, api_key=api_key, max_body_bytes=max_body_bytes)
    if insecure:
        console.print("[yellow]warning:[/] --insecure: no encryption and no authentication on any worker socket")
        keys.insecure_already_reported()  # one warning, not one per socket
    if no_auth:
        console.print(f"[yellow]warning:[/] --no-auth: anyone who reaches {host} can send requests")
    from partita.model.hf import is_hf_ref

    if is_hf_ref(model):  # a causal LM: OpenAI-compatible /v1 completions (see partita.serve.openai)
        from partita.serve.openai import serve_generator

        serve_generator(model, cluster, name=name, host=host, port=port, api_key=api_key, secret_key=secret_key,
                        insecure=insecure, detection_s=detection, console=console)
        return
    shapes = parse_input_shapes(input_shape)
    module = load_ref(model)
    with open_cluster(cluster, secret_key=secret_key, insecure=insecure) as handle:
        with console.status(f"deploying {options.name} for batches of {max_batch}…", spinner="dots"):
            pipe, signature = deploy_for_serving(
                module, shapes, handle, max_rows=max_batch, objective=objective, planner=planner, codec=codec,
                supervise=Supervision(detection_s=detection, standby=standby),
            )
        try:
            service = Service(pipe, signature, handle.spec, options,
                              on_plan_change=lambda line: console.print(f"[bold]plan changed:[/] {line}", highlight=False))
            server = InferenceServer(service)
        except BaseException:
            pipe.close()
            raise
        console.print(f"[bold]plan:[/] {plan_line(pipe.plan)}", highlight=False)
        console.print(f"API:       {server.url}/v2/models/{options.name}/infer", highlight=False)
        console.print(f"dashboard: {server.url}/", highlight=False)
        console.print("Ctrl-C or SIGTERM drains the requests in flight and stops", style="dim")
        server.run()
        state = service.state.snapshot()["requests"]
        console.print(f"stopped: {state.get('ok', 0)} request(s) answered, {state.get('failed', 0)} failed", highlight=False)


def require_serve_extra() -> None:
    """ServeError naming the install command when the `serve` extra's packages are missing."""
    import importlib.util

    from partita.errors import ServeError

    missing = [name for name in ("starlette", "uvicorn", "prometheus_client") if importlib.util.find_spec(name) is None]
    if missing:
        raise ServeError(f"partita serve needs {', '.join(missing)}: pip install 'partita[serve]'")


def default_name(model: str) -> str:
    """The API name for a model reference: torchvision:resnet50 -> resnet50, zoo.py:mlp -> mlp, m.pt2 -> m."""
    tail = model.rsplit(":", 1)[-1] if ":" in model else Path(model).stem
    tail = tail.rsplit(".", 1)[-1] if ":" in model else tail
    return tail.replace("/", "_") or "model"
