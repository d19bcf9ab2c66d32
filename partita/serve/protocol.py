"""The Open Inference Protocol v2 (KServe v2 REST) infer request and response, with binary tensors.

An infer request is a JSON object `{"id"?, "parameters"?, "inputs": [...], "outputs"?: [...]}`;
each input has `name`, `shape`, `datatype` and either `data` (row-major, flat or nested JSON
numbers) or, with the binary tensor data extension, `parameters.binary_data_size`: its raw
little-endian bytes follow the JSON, whose length the `Inference-Header-Content-Length` header
gives, in the order of the inputs. A requested output (or the request's
`parameters.binary_data_output`) with `binary_data: true` comes back the same way.

`parse_request` checks everything against the model's signature before any tensor reaches the
batcher: a bad request raises `InferRequestError` with what was expected, never anything else.
Nothing is unpickled: tensors are built from JSON numbers or raw buffers of a known dtype.
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from partita.errors import InferRequestError
from partita.serve.signature import DATATYPES, ModelSignature

HEADER_LENGTH = "inference-header-content-length"

# numpy dtypes for the raw bytes of each datatype (little-endian, as the extension specifies).
_NUMPY: dict[str, str] = {
    "BOOL": "|b1", "UINT8": "|u1", "INT8": "|i1", "INT16": "<i2", "INT32": "<i4", "INT64": "<i8",
    "FP16": "<f2", "FP32": "<f4", "FP64": "<f8",
}


@dataclass(frozen=True)
class InferRequest:
    """A checked request: `inputs` in signature order, `rows` its batch size, which outputs to return how."""

    id: str | None
    inputs: tuple[torch.Tensor, ...]
    rows: int
    outputs: tuple[tuple[str, bool], ...]  # (output name, as binary data), in the order asked


def parse_request(body: bytes, header_length: str | None, signature: ModelSignature, *, max_rows: int) -> InferRequest:
    """Decode and check one infer request body (see the module docstring)."""
    json_part, binary = _split_body(body, header_length)
    try:
        request = json.loads(json_part)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InferRequestError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:  # json.loads recurses per nesting level: a hostile body must not become a 500
        raise InferRequestError("the request body nests JSON too deeply") from None
    if not isinstance(request, dict) or not isinstance(request.get("inputs"), list):
        raise InferRequestError('expected a JSON object with "inputs": a list of tensors '
                                '({"name", "shape", "datatype", "data"})')
    parameters = _object(request.get("parameters", {}), "parameters")
    expected = {meta.name: meta for meta in signature.inputs}
    given: dict[str, torch.Tensor] = {}
    offset = 0
    for item in request["inputs"]:
        item = _object(item, "each input")
        name = item.get("name")
        if name not in expected:
            raise InferRequestError(f"unknown input {name!r}; the model takes {_listing(signature.inputs)}")
        if name in given:
            raise InferRequestError(f"input {name!r} is given twice")
        tensor, offset = _tensor(item, expected[name], binary, offset)
        given[name] = tensor
    missing = [n for n in expected if n not in given]
    if missing:
        raise InferRequestError(f"missing input(s) {missing}; the model takes {_listing(signature.inputs)}")
    if offset != len(binary):
        raise InferRequestError(f"{len(binary) - offset} bytes of binary data follow the JSON but no input "
                                "claims them (binary_data_size)")
    rows = {t.shape[0] for t in given.values()}
    if len(rows) != 1:
        raise InferRequestError(f"the inputs disagree on the batch size (dimension 0): {sorted(rows)}")
    batch = rows.pop()
    if batch > max_rows:
        raise InferRequestError(f"the batch has {batch} rows; this server takes at most {max_rows} per request "
                                "(--max-batch); send it in smaller requests")
    request_id = request.get("id")
    return InferRequest(
        id=None if request_id is None else str(request_id),
        inputs=tuple(given[m.name] for m in signature.inputs),
        rows=batch,
        outputs=_requested_outputs(request.get("outputs"), parameters, signature),
    )


def encode_response(model: str, request: InferRequest, signature: ModelSignature,
                    outputs: tuple[torch.Tensor, ...]) -> tuple[bytes, dict[str, str]]:
    """The response body and its extra headers (`Inference-Header-Content-Length` when binary data follows)."""
    index = {meta.name: i for i, meta in enumerate(signature.outputs)}
    entries, chunks = [], []
    for name, as_binary in request.outputs:
        meta, tensor = signature.outputs[index[name]], outputs[index[name]]
        entry: dict[str, Any] = {"name": name, "datatype": meta.datatype, "shape": list(tensor.shape)}
        if as_binary:
            raw = _raw_bytes(tensor, meta.datatype)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        else:
            entry["data"] = _json_data(tensor)
        entries.append(entry)
    response: dict[str, Any] = {"model_name": model, "outputs": entries}
    if request.id is not None:
        response["id"] = request.id
    header = json.dumps(response, separators=(",", ":"), allow_nan=True).encode()
    if not chunks:
        return header, {}
    return header + b"".join(chunks), {"Inference-Header-Content-Length": str(len(header))}


# ----------------------------------------------------------------------------------------- parts

def _split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    try:
        length = int(header_length)
    except ValueError:
        raise InferRequestError(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
    if not 0 <= length <= len(body):
        raise InferRequestError(f"Inference-Header-Content-Length is {length} but the body has {len(body)} bytes")
    return body[:length], body[length:]


def _object(value: Any, what: str) -> dict:
    if not isinstance(value, dict):
        raise InferRequestError(f"{what} must be a JSON object, got {type(value).__name__}")
    return value


def _listing(metas: Any) -> str:
    return ", ".join(f"{m.name} ({m.datatype}{list(m.shape)})" for m in metas)


def _tensor(item: dict, meta: Any, binary: bytes, offset: int) -> tuple[torch.Tensor, int]:
    name, datatype, shape = meta.name, item.get("datatype"), item.get("shape")
    if datatype != meta.datatype:
        raise InferRequestError(f"input {name!r} has datatype {datatype!r}; expected {meta.datatype}")
    if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
            or len(shape) != len(meta.shape) or shape[0] < 1
            or any(want != -1 and want != got for want, got in zip(meta.shape, shape, strict=True))):
        raise InferRequestError(f"input {name!r} has shape {shape}; expected {list(meta.shape)} "
                                "(-1: the batch dimension, at least 1)")
    count = math.prod(shape)
    params = _object(item.get("parameters", {}), f"the parameters of input {name!r}")
    size = params.get("binary_data_size")
    if size is not None:
        return _from_binary(name, datatype, shape, count, size, binary, offset)
    if "data" not in item:
        raise InferRequestError(f"input {name!r} has neither data nor parameters.binary_data_size")
    return _from_json(name, datatype, shape, count, item["data"]), offset


def _from_binary(name: str, datatype: str, shape: list, count: int, size: Any, binary: bytes, offset: int):
    if datatype == "BF16":
        itemsize = 2
    else:
        itemsize = np.dtype(_NUMPY[datatype]).itemsize
    if type(size) is not int or size != count * itemsize:
        raise InferRequestError(f"input {name!r}: binary_data_size is {size!r}; shape {shape} of {datatype} "
                                f"needs {count * itemsize} bytes")
    if offset + size > len(binary):
        raise InferRequestError(f"input {name!r}: binary_data_size {size} runs past the end of the body "
                                f"({len(binary) - offset} bytes left)")
    raw = binary[offset:offset + size]
    if datatype == "BF16":
        values = torch.frombuffer(bytearray(raw), dtype=torch.int16).view(torch.bfloat16)
    else:
        values = torch.from_numpy(np.frombuffer(raw, dtype=_NUMPY[datatype]).copy())
    return values.reshape(shape).to(DATATYPES[datatype]), offset + size


def _from_json(name: str, datatype: str, shape: list, count: int, data: Any) -> torch.Tensor:
    if datatype == "BF16":
        raise InferRequestError(f"input {name!r}: BF16 travels only as binary data (binary_data_size)")
    flat = _flatten(data)
    if flat is None:
        raise InferRequestError(f"input {name!r}: data must be a list of numbers (flat or nested)")
    if len(flat) != count:
        raise InferRequestError(f"input {name!r}: data has {len(flat)} values; shape {shape} needs {count}")
    kind = bool if datatype == "BOOL" else float if datatype.startswith("FP") else int
    if not all(_fits(v, kind) for v in flat):
        raise InferRequestError(f"input {name!r}: data must hold {datatype} values "
                                f"({'true/false' if kind is bool else 'numbers' if kind is float else 'integers'})")
    try:
        array = np.asarray(flat, dtype=_NUMPY[datatype])
    except OverflowError:
        raise InferRequestError(f"input {name!r}: a value is out of range for {datatype}") from None
    return torch.from_numpy(array.reshape(shape))


def _fits(value: Any, kind: type) -> bool:
    if kind is bool:
        return type(value) is bool
    if kind is int:
        return type(value) is int
    return type(value) in (int, float)


def _flatten(data: Any) -> list | None:
    if not isinstance(data, list):
        return None
    if not any(isinstance(v, list) for v in data):
        return data
    out: list = []
    stack = [iter(data)]
    while stack:  # iterative: a deeply nested body must not exhaust the recursion limit
        item = next(stack[-1], _END)
        if item is _END:
            stack.pop()
        elif isinstance(item, list):
            if len(stack) > 64:
                return None
            stack.append(iter(item))
        else:
            out.append(item)
    return out


_END = object()


def _requested_outputs(outputs: Any, parameters: dict, signature: ModelSignature) -> tuple[tuple[str, bool], ...]:
    default_binary = parameters.get("binary_data_output") is True
    if outputs is None:
        return tuple((m.name, default_binary) for m in signature.outputs)
    if not isinstance(outputs, list):
        raise InferRequestError('"outputs" must be a list of {"name": ...}')
    known = {m.name for m in signature.outputs}
    chosen = []
    for item in outputs:
        item = _object(item, "each requested output")
        name = item.get("name")
        if name not in known:
            raise InferRequestError(f"unknown output {name!r}; the model gives {_listing(signature.outputs)}")
        params = _object(item.get("parameters", {}), f"the parameters of output {name!r}")
        chosen.append((name, params.get("binary_data", default_binary) is True))
    return tuple(chosen)


def _raw_bytes(tensor: torch.Tensor, datatype: str) -> bytes:
    tensor = tensor.detach().cpu().contiguous()
    if datatype == "BF16":
        return tensor.view(torch.int16).numpy().astype("<i2").tobytes()
    array = tensor.numpy()
    if sys.byteorder != "little":
        array = array.astype(_NUMPY[datatype])
    return array.tobytes()


def _json_data(tensor: torch.Tensor) -> list:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.float()
    return tensor.reshape(-1).tolist()
