"""Model references: one string that names a model, for the CLI and for configs.

Forms (the module comes back in eval mode):

    torchvision:NAME                      a torchvision model with random weights (e.g. torchvision:resnet50)
    torchvision:NAME?weights=PATH         ... with its state dict loaded from a local .safetensors file
    package.module:factory                a function (or class) importable from an installed module
    path/to/file.py:factory               a function (or class) defined in a Python file
    ...:factory?weights=PATH              ... with its state dict loaded from a local .safetensors file
    path/to/model.pt2                     a program saved with torch.export.save

A factory is called without arguments and must return a torch.nn.Module.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any, NoReturn
from urllib.parse import parse_qs

import torch

from partita.errors import ModelRefError, StageFormatError
from partita.model.archive import check_user_program

FORMS = (
    "torchvision:NAME[?weights=PATH.safetensors]",
    "package.module:factory[?weights=PATH.safetensors]",
    "path/to/file.py:factory[?weights=PATH.safetensors]",
    "path/to/model.pt2",
)


def load_ref(ref: str) -> torch.nn.Module:
    """Resolve a model reference (see the module docstring) to a module in eval mode.

    Raises ModelRefError, listing the valid forms, for an unknown form, a missing file, module
    or factory, or a factory that does not return an nn.Module.
    """
    if not isinstance(ref, str) or not ref.strip():
        _fail(ref, "empty reference")
    ref = ref.strip()
    if ref.endswith(".pt2") and ":" not in ref.replace("\\", "/").split("/")[-1]:
        return _load_pt2(ref)  # an exported program has no train mode: it is fixed at export time
    elif ref.startswith("torchvision:"):
        module = _load_torchvision(ref)
    elif ":" in ref:
        spec, _, query = ref.partition("?")
        target, _, factory = spec.rpartition(":")
        if not target or not factory.isidentifier():
            _fail(ref, f"{factory!r} is not a factory name")
        if target.endswith(".py"):
            module = _call_factory(ref, _import_file(ref, target), factory, where=target)
        else:
            module = _call_factory(ref, _import_module(ref, target), factory, where=f"module {target}")
        if query:
            _load_weights(ref, module, query, factory)
    else:
        _fail(ref, "unknown form")
    return module.eval()


def _fail(ref: Any, why: str, cause: BaseException | None = None) -> NoReturn:
    """Raise the one-line error; `cause` (the user's own exception) is chained for `partita --debug`."""
    raise ModelRefError(f"cannot load model {ref!r}: {why}. Valid forms: {', '.join(FORMS)}") from cause


def _did_you_mean(name: str, choices: list[str]) -> str:
    """' (did you mean a, b?)' for the choices closest to a mistyped name, or ''."""
    close = difflib.get_close_matches(name, choices, n=3, cutoff=0.6)
    close += [c for c in choices if name and (name in c or c in name) and c not in close]
    return f" (did you mean {', '.join(close[:4])}?)" if close else ""


def _load_pt2(ref: str) -> torch.nn.Module:
    path = Path(ref)
    if not path.is_file():
        _fail(ref, f"no file {path}")
    try:
        # torch.export.load falls back to full unpickling on several paths; refuse those first.
        check_user_program(path.read_bytes())
    except StageFormatError as exc:
        _fail(ref, f"{path} was refused: {exc}")
    try:
        # A user's own saved program, loaded like torch.export.load does (it is not a shipped stage).
        exported = torch.export.load(str(path))
    except Exception as exc:  # torch.export.load raises many types for a bad file
        _fail(ref, f"{path} is not a torch.export archive ({type(exc).__name__}: {exc})")
    return exported.module()


def _load_torchvision(ref: str) -> torch.nn.Module:
    spec = ref.removeprefix("torchvision:")
    name, _, query = spec.partition("?")
    options = parse_qs(query, keep_blank_values=True) if query else {}
    unknown = set(options) - {"weights"}
    if unknown:
        _fail(ref, f"unknown option(s) {sorted(unknown)}; the only option is weights=PATH")
    try:
        import torchvision
    except ImportError:  # torchvision is an optional extra
        _fail(ref, "torchvision is not installed (pip install 'partita[vision]')")
    available = torchvision.models.list_models()
    if name not in available:
        _fail(ref, f"torchvision has no model {name!r}{_did_you_mean(name, available)}")
    module = torchvision.models.get_model(name, weights=None)
    if "weights" in options:
        state = _read_safetensors(ref, options["weights"][-1])
        try:
            module.load_state_dict(state)
        except RuntimeError as exc:  # load_state_dict reports missing/unexpected keys and bad shapes this way
            _fail(ref, f"the weights do not fit torchvision's {name}: {str(exc).splitlines()[0]}")
    return module


def _load_weights(ref: str, module: torch.nn.Module, query: str, factory: str) -> None:
    """Apply a factory reference's `?weights=PATH` (a safetensors state dict, e.g. from `partita fl`)."""
    options = parse_qs(query, keep_blank_values=True)
    if set(options) != {"weights"}:
        _fail(ref, f"unknown option(s) {sorted(set(options) - {'weights'})}; the only option is weights=PATH")
    state = _read_safetensors(ref, options["weights"][-1])
    try:
        module.load_state_dict(state)
    except RuntimeError as exc:  # load_state_dict reports missing/unexpected keys and bad shapes this way
        _fail(ref, f"the weights do not fit {factory}(): {str(exc).splitlines()[0]}")


def _read_safetensors(ref: str, path_text: str) -> dict[str, torch.Tensor]:
    path = Path(path_text)
    if path.suffix != ".safetensors":
        _fail(ref, f"weights must be a .safetensors file, got {path_text!r}")
    if not path.is_file():
        _fail(ref, f"no weights file {path}")
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        _fail(ref, f"{path} is not a safetensors file ({exc})")
    raise AssertionError("unreachable")


def _import_module(ref: str, dotted: str) -> Any:
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        _fail(ref, f"no module {exc.name or dotted!r}")
    except Exception as exc:  # importing user code can raise anything; say which module failed
        _fail(ref, f"importing {dotted} failed: {type(exc).__name__}: {exc}", exc)


def _import_file(ref: str, path_text: str) -> Any:
    path = Path(path_text)
    if not path.is_file():
        _fail(ref, f"no file {path}")
    name = f"partita_user_model_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        _fail(ref, f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # running user code can raise anything; say which file failed
        del sys.modules[name]
        _fail(ref, f"running {path} failed: {type(exc).__name__}: {exc}", exc)
    return module


def _call_factory(ref: str, module: Any, factory: str, *, where: str) -> torch.nn.Module:
    """Call `factory` from `module`; `where` names it for the user (the file, not our import name)."""
    fn = getattr(module, factory, None)
    if fn is None:
        public = [n for n, v in vars(module).items() if callable(v) and not n.startswith("_")]
        _fail(ref, f"{where} has no {factory!r}{_did_you_mean(factory, public)}")
    if not callable(fn):
        _fail(ref, f"{factory!r} is not callable")
    try:
        result = fn()
    except Exception as exc:  # user factories can raise anything; report it as a bad reference
        _fail(ref, f"{factory}() failed: {type(exc).__name__}: {exc} (partita --debug shows its traceback)", exc)
    if not isinstance(result, torch.nn.Module):
        _fail(ref, f"{factory}() returned {type(result).__name__}, not a torch.nn.Module")
    return result
