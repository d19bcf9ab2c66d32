"""Refuse unsafe stage archives before torch.export.load reads them.

torch.export.load (PyTorch 2.x, `torch/export/pt2_archive/_package.py` and
`torch/_export/serde/serialize.py`) executes code from the archive on several paths:

- `data/sample_inputs/<model>.pt` is read with `torch.load(weights_only=True)` and, when that fails,
  again with `weights_only=False`: a full unpickle.
- a weight or constant whose config says `use_pickle: true` is read with `torch.load(weights_only=False)`;
- constants named `opaque_obj_*` go to `pickle.loads`, `custom_obj_*` to the TorchScript unpickler;
- legacy `data/weights/<model>.pt` / `data/constants/<model>.pt` files, and the pre-pt2 archive
  format, reach the same `weights_only=False` fallback;
- `data/aotinductor/` makes it load a compiled shared library;
- every symbolic size in `models/<model>.json` is parsed with `sympy.sympify`, which evaluates the
  string as Python;
- graph node targets name arbitrary attributes under `torch`, `operator` or `math`;
- `guards_code` strings are compiled into Python when the program is turned into a module.

`check(data)` accepts only what `StageProgram.to_bytes` writes: a stored (uncompressed) zip with one
root folder and exactly the expected entries, tensor payloads described by JSON configs that never
ask for pickle, empty sample inputs, size expressions made only of integers, size symbols and
sympy's integer functions, no guards code, and node targets that are aten operators or Python's
arithmetic operators. Anything else is a StageFormatError, raised before torch.export.load runs.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from collections.abc import Iterator
from typing import Any

from partita.errors import StageFormatError

MODEL = "model"
_FIXED = {
    "archive_format",
    "archive_version",
    "byteorder",
    ".data/version",
    ".data/serialization_id",
    f"models/{MODEL}.json",
    f"data/weights/{MODEL}_weights_config.json",
    f"data/constants/{MODEL}_constants_config.json",
    f"data/sample_inputs/{MODEL}.pt",
    "extra/partita_stage.json",
}
_REQUIRED = _FIXED - {"byteorder", ".data/version", ".data/serialization_id"}
_PAYLOAD = re.compile(r"^data/(weights/weight_\d+|constants/tensor_\d+)$")
_ROOT = re.compile(r"^[A-Za-z0-9_.-]+$")

#: Python operators a graph may call on sizes and tuples (serialized as "_operator.NAME").
_OPERATORS = {
    "getitem", "add", "sub", "mul", "floordiv", "truediv", "mod", "neg", "pow", "pos",
    "eq", "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_", "abs",
}  # fmt: skip
#: torch / math functions on sizes that torch.export may record.
_SYM_FUNCTIONS = {
    "torch.sym_int", "torch.sym_float", "torch.sym_max", "torch.sym_min", "torch.sym_not",
    "torch.sym_ite", "torch.sym_sqrt", "torch.sym_sum", "torch._sym_sqrt",
    "math.ceil", "math.floor", "math.sqrt", "math.trunc",
}  # fmt: skip
#: aten operators that reach outside the tensors they are given.
_ATEN_DENIED = {"from_file", "_load", "save"}
_ATEN = re.compile(r"^torch\.ops\.aten\.([A-Za-z0-9_]+)(\.[A-Za-z0-9_]+)?$")

#: Names allowed in a size expression: sympy/torch integer functions, booleans, infinity.
_EXPR_FUNCTIONS = {
    "FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
    "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv",
    "IsNonOverlappingAndDenseIndicator", "TruncToFloat", "TruncToInt", "RoundToInt", "RoundDecimal",
    "ToFloat", "Identity", "Max", "Min", "Eq", "Ne", "Lt", "Le", "Gt", "Ge", "And", "Or", "Not",
    "Abs", "True", "False", "oo", "zoo", "nan", "sqrt", "floor", "ceiling",
}  # fmt: skip
_EXPR_CHARS = re.compile(r"^[A-Za-z0-9_+\-*/%()<>=!&|~,. ]*$")
_EXPR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_SYMBOL = re.compile(r"^(s|u|ps|zuf|zf|q|c|d|i|x|y|z|f|uf)\d+$")
#: How torch.export writes a bare size symbol: Symbol('s95', positive=True, integer=True).
_SYMBOL_DECLARATION = re.compile(
    r"^Symbol\('([a-z]+\d+)'(?:, (?:positive|integer|nonnegative|real|finite)=(?:True|False))*\)$"
)
#: A size symbol or an integer inside a sympy srepr expression, e.g. Mul(Integer(64), Symbol('s27', positive=True)).
_SREPR_SYMBOL = re.compile(r"Symbol\('([a-z]+\d+)'(?:, (?:positive|integer|nonnegative|real|finite)=(?:True|False))*\)")
_SREPR_INTEGER = re.compile(r"Integer\((-?\d+)\)")
#: sympy's arithmetic in srepr form (a decoder's sizes: 64 * tokens, past + 1).
_SREPR_FUNCTIONS = {"Mul", "Add", "Pow"}
_DOT_OUTSIDE_NUMBER = re.compile(r"(?<![0-9])\.|\.(?![0-9])")


def check(data: bytes) -> None:
    """Raise StageFormatError unless `data` is a stage archive safe to hand to torch.export.load."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise StageFormatError(f"not a stage archive: the bytes are not a zip file ({exc})") from exc
    with archive:
        entries = _entries(archive)
        missing = sorted(_REQUIRED - set(entries))
        if missing:
            raise StageFormatError(f"not a stage archive: entries {missing} are missing")
        if entries[f"data/sample_inputs/{MODEL}.pt"].file_size != 0:
            raise StageFormatError("stage archive carries pickled sample inputs; stage archives never do")
        if _read(archive, entries, "archive_format").strip() != "pt2":
            raise StageFormatError("stage archive is not in torch.export's pt2 format")
        for kind in ("weights", "constants"):
            _check_payload_config(archive, entries, kind)
        try:
            program = json.loads(_read(archive, entries, f"models/{MODEL}.json"))
        except ValueError as exc:
            raise StageFormatError(f"stage archive's program is not JSON: {exc}") from exc
        _check_program(program)


def _entries(archive: zipfile.ZipFile) -> dict[str, zipfile.ZipInfo]:
    """Entries by name relative to the single root folder; refuses anything unexpected."""
    entries: dict[str, zipfile.ZipInfo] = {}
    roots = set()
    for info in archive.infolist():
        name = info.filename
        root, _, rest = name.partition("/")
        if (
            not rest
            or not _ROOT.match(root)
            or "\\" in name
            or ".." in name.split("/")
            or name.startswith("/")
        ):
            raise StageFormatError(f"stage archive has an unexpected entry {name!r}")
        if info.compress_type != zipfile.ZIP_STORED:
            raise StageFormatError(f"stage archive entry {name!r} is compressed; stage archives are stored")
        if rest in entries:
            raise StageFormatError(f"stage archive has entry {rest!r} twice")
        if rest not in _FIXED and not _PAYLOAD.match(rest):
            raise StageFormatError(
                f"stage archive has an unexpected entry {rest!r} (only weights, tensor constants, the "
                "program JSON and partita metadata are accepted)"
            )
        roots.add(root)
        entries[rest] = info
    if len(roots) != 1:
        raise StageFormatError(f"stage archive must have one root folder, found {sorted(roots)}")
    return entries


def _read(archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], name: str) -> str:
    try:
        return archive.read(entries[name]).decode("utf-8")
    except (UnicodeDecodeError, zipfile.BadZipFile, OSError) as exc:
        raise StageFormatError(f"stage archive entry {name!r} is unreadable: {exc}") from exc


def _check_payload_config(archive: zipfile.ZipFile, entries: dict[str, zipfile.ZipInfo], kind: str) -> None:
    """Every weight/constant must be a raw tensor payload present in the archive: never a pickle."""
    name = f"data/{kind}/{MODEL}_{kind}_config.json"
    try:
        config = json.loads(_read(archive, entries, name))
        items = config["config"].items()
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StageFormatError(f"stage archive's {name} is malformed: {exc}") from exc
    prefix = "weight_" if kind == "weights" else "tensor_"
    for fqn, meta in items:
        if (
            not isinstance(meta, dict)
            or meta.get("use_pickle") is not False
            or not isinstance(meta.get("tensor_meta"), dict)
        ):
            raise StageFormatError(
                f"stage archive {kind[:-1]} {fqn!r} is not a plain tensor (pickled objects are refused)"
            )
        path = meta.get("path_name")
        if (
            not isinstance(path, str)
            or not re.fullmatch(prefix + r"\d+", path)
            or f"data/{kind}/{path}" not in entries
        ):
            raise StageFormatError(
                f"stage archive {kind[:-1]} {fqn!r} points at {path!r}, which is not a payload of the archive"
            )


def _check_program(program: Any) -> None:
    if not isinstance(program, dict) or program.get("guards_code", []) != []:
        raise StageFormatError("stage program carries guard code; stage archives never do")
    for key, value in _walk(program):
        if key in ("target", "as_operator") and isinstance(value, str):
            _check_target(value)
        elif key == "expr_str":
            _check_expr(value)


def _walk(value: Any, key: str | None = None) -> Iterator[tuple[str | None, Any]]:
    yield key, value
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _walk(v, k)
    elif isinstance(value, list):
        for v in value:
            yield from _walk(v, key)


def _check_target(target: str) -> None:
    if target.startswith("_operator."):
        if target.removeprefix("_operator.") in _OPERATORS:
            return
    elif target in _SYM_FUNCTIONS:
        return
    else:
        match = _ATEN.match(target)
        if match and match.group(1) not in _ATEN_DENIED:
            return
    raise StageFormatError(f"stage program calls {target!r}; stage programs may only call aten operators")


def _check_expr(expr: Any) -> None:
    """A size expression may hold integers, size symbols (s0, u3 …), operators and integer functions."""
    if isinstance(expr, str):
        declared = _SYMBOL_DECLARATION.match(expr)
        if declared and _SYMBOL.match(declared.group(1)):
            return
        expr = _SREPR_INTEGER.sub(r"\1", _SREPR_SYMBOL.sub(r"\1", expr))
    ok = isinstance(expr, str) and len(expr) < 10_000 and _EXPR_CHARS.match(expr) and "__" not in expr
    ok = ok and not _DOT_OUTSIDE_NUMBER.search(expr)
    if ok:
        for name in _EXPR_NAME.findall(expr):
            if name not in _EXPR_FUNCTIONS and name not in _SREPR_FUNCTIONS and not _SYMBOL.match(name):
                ok = False
                break
    if not ok:
        raise StageFormatError(
            f"stage program has a size expression that is not plain arithmetic: {str(expr)[:80]!r}"
        )


def check_user_program(data: bytes) -> None:
    """Refuse a user's saved .pt2 file if torch.export.load would unpickle anything from it.

    A program the user saved with torch.export.save legitimately carries sample inputs and guard
    code, so `check` (stage archives only) is too strict for it. This closes the pickle paths
    listed in the module docstring: sample inputs must load with `weights_only=True`, weights and
    constants must be raw tensor payloads, and opaque or TorchScript objects, legacy `.pt` weight
    files and compiled AOTInductor libraries are refused.
    """
    import torch  # only here: the stage-archive check itself needs no torch

    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except (zipfile.BadZipFile, ValueError, OSError) as exc:
        raise StageFormatError(f"not a torch.export archive: the bytes are not a zip file ({exc})") from exc
    with archive:
        for info in archive.infolist():
            name = info.filename.split("/", 1)[-1]
            if name.startswith("data/aotinductor/") or re.fullmatch(r"data/(weights|constants)/[^/]+\.pt", name):
                raise StageFormatError(f"archive entry {name!r} would be loaded as a pickle or a compiled library")
            if re.fullmatch(r"data/constants/(opaque_obj|custom_obj)_[^/]*", name):
                raise StageFormatError(f"archive constant {name!r} is a Python object (pickle); refused")
            if re.fullmatch(r"data/(weights|constants)/[^/]+_config\.json", name):
                try:
                    config = json.loads(archive.read(info).decode("utf-8"))
                    metas = list(config["config"].values())
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise StageFormatError(f"archive entry {name!r} is malformed: {exc}") from exc
                if any(not isinstance(meta, dict) or meta.get("use_pickle") is not False for meta in metas):
                    raise StageFormatError(f"archive entry {name!r} asks for pickled objects; refused")
            if name.startswith("data/sample_inputs/") and info.file_size:
                try:
                    # weights_only=True unpickles tensors and containers only, never arbitrary objects.
                    torch.load(io.BytesIO(archive.read(info)), weights_only=True)
                except Exception as exc:  # any failure here means torch would retry with a full unpickle
                    raise StageFormatError(
                        f"archive sample inputs {name!r} are not plain tensors ({type(exc).__name__}); refused"
                    ) from exc
