"""`partita inspect MODEL`: capture a model and show its chain of segments."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer

from partita.errors import ModelRefError

DEFAULT_SHAPE = "1,3,224,224"
MIB = 2**20


def parse_input_shapes(values: list[str] | None) -> list[tuple[int, ...]]:
    """Input shapes from `--input-shape` values: repeat the option or separate shapes with ';'.

    "1,3,224,224" -> [(1, 3, 224, 224)]; "1,16;1,8" -> [(1, 16), (1, 8)]. ModelRefError when malformed.
    """
    shapes = []
    for value in values or [DEFAULT_SHAPE]:
        for part in value.split(";"):
            part = part.strip().strip("()[]")
            if not part:
                continue
            try:
                dims = tuple(int(d) for d in part.replace("x", ",").split(",") if d.strip())
            except ValueError:
                dims = ()
            if not dims or any(d <= 0 for d in dims):
                raise ModelRefError(
                    f"--input-shape {value!r}: expected positive integers like 1,3,224,224 (';' between inputs)"
                )
            shapes.append(dims)
    return shapes


def inspect(
    model: Annotated[
        str,
        typer.Argument(
            help="Model reference: torchvision:NAME, package.module:factory, file.py:factory, model.pt2"
        ),
    ],
    input_shape: Annotated[
        list[str] | None,
        typer.Option(
            "--input-shape",
            help="Shape of the example input, e.g. 1,3,224,224 (the default). For several inputs repeat the "
            "option or separate shapes with ';'. The first dimension is the batch.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the model profile JSON the planner reads.")
    ] = False,
) -> None:
    """Capture MODEL with torch.export and show its segments: FLOPs, weights and bytes crossing each cut."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from partita.model import capture, load_ref

    shapes = parse_input_shapes(input_shape)
    console = Console(stderr=as_json)
    with console.status(f"loading {model}…", spinner="dots") as status:
        module = load_ref(model)
        torch.manual_seed(0)
        inputs = tuple(torch.randn(shape) for shape in shapes)
        status.update(f"capturing {model} with torch.export…")
        started = time.perf_counter()
        graph = capture(module, inputs, name=model)
        capture_s = time.perf_counter() - started

    if as_json:
        typer.echo(json.dumps(graph.to_profile(), indent=2))
        return

    table = Table(title=f"{model}  input {' ; '.join('x'.join(map(str, s)) for s in shapes)}")
    table.add_column("#", justify="right")
    table.add_column("segment")
    table.add_column("GFLOPs", justify="right")
    table.add_column("params MiB", justify="right")
    table.add_column("crossing MiB", justify="right")
    for i, segment in enumerate(graph.segments):
        table.add_row(
            str(i),
            segment.name,
            _number(segment.flops / 1e9),
            _number(segment.param_bytes / MIB),
            _number(segment.out_bytes / MIB),
        )
    total_flops = sum(s.flops for s in graph.segments)
    total_params = sum(s.param_bytes for s in graph.segments)
    table.add_section()
    table.add_row(
        "",
        f"total ({len(graph.segments)} segments)",
        _number(total_flops / 1e9),
        _number(total_params / MIB),
        "",
    )
    console.print(table)
    batch = "dynamic batch" if graph.dynamic_batch else "static batch"
    console.print(
        f"input {graph.input_bytes / MIB:.3f} MiB · {batch} · captured in {capture_s:.2f} s "
        "(crossing = bytes sent to the next stage if cut after this segment; last row: the outputs)"
    )


def _number(value: float) -> str:
    """Three significant digits without exponent for everyday sizes: 8.18, 0.766, 0.000412."""
    if value == 0:
        return "0"
    return f"{value:.3g}" if 1e-4 <= abs(value) < 1e5 else f"{value:.2e}"
