"""`hf:PATH` model references: a local Hugging Face causal language model directory.

The directory holds what `save_pretrained` writes: `config.json`, the weights (`*.safetensors`)
and the tokenizer files. `hf:FILE.gguf` loads a GGUF file instead (weights, config and tokenizer
in one file, dequantised by transformers to float32; needs the extra `partita[gguf]`). Loading
never downloads (this runs with the hub switched off), and needs the optional extra
`partita[llm]` (transformers).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from partita.errors import ModelRefError

PREFIX = "hf:"


def is_hf_ref(ref: str) -> bool:
    return isinstance(ref, str) and ref.strip().startswith(PREFIX)


@dataclass(frozen=True)
class CausalLM:
    """A loaded causal LM: the transformers model (eval mode, float32 unless saved otherwise) and its tokenizer."""

    name: str
    model: Any
    tokenizer: Any


def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError as exc:
        raise ModelRefError(
            "hf: models need the transformers package; install partita with the llm extra: pip install 'partita[llm]'"
        ) from exc
    transformers.utils.logging.disable_progress_bar()
    return transformers


def load_hf(ref: str) -> CausalLM:
    """Load `hf:PATH` (a local directory, or a .gguf file) as a causal LM with its tokenizer; ModelRefError on any problem."""
    path = Path(ref.strip().removeprefix(PREFIX)).expanduser()
    if path.suffix.lower() == ".gguf":
        return _load_gguf(ref, path)
    if not path.is_dir():
        raise ModelRefError(f"cannot load model {ref!r}: {path} is not a directory (hf:PATH names a local "
                            "Hugging Face model directory with config.json, weights and tokenizer)")
    if not (path / "config.json").is_file():
        raise ModelRefError(f"cannot load model {ref!r}: {path} has no config.json")
    transformers = _transformers()
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, attn_implementation="sdpa")
    except Exception as exc:  # transformers raises many types (OSError, ValueError, KeyError) for a bad directory
        raise ModelRefError(f"cannot load model {ref!r}: {type(exc).__name__}: {exc}") from exc
    try:
        tokenizer = _tokenizer_class(transformers, path).from_pretrained(path, local_files_only=True)
    except Exception as exc:  # as above
        raise ModelRefError(f"cannot load the tokenizer of {ref!r}: {type(exc).__name__}: {exc}") from exc
    return CausalLM(path.name, model.eval(), tokenizer)


def _load_gguf(ref: str, path: Path) -> CausalLM:
    """`hf:FILE.gguf`: transformers reads the model, its config and its tokenizer from the one file."""
    if not path.is_file():
        raise ModelRefError(f"cannot load model {ref!r}: {path} is not a file")
    transformers = _transformers()
    try:
        import gguf  # noqa: F401 - transformers needs it to read the file; say so in one line
    except ImportError as exc:
        raise ModelRefError("hf:FILE.gguf needs the gguf package: pip install 'partita[gguf]'") from exc
    where = {"gguf_file": path.name, "local_files_only": True}
    try:
        with quiet_gguf_reader():
            model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, attn_implementation="sdpa", **where)
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, **where)
    except Exception as exc:  # transformers raises many types for a file it cannot read
        raise ModelRefError(f"cannot load model {ref!r}: {type(exc).__name__}: {exc}") from exc
    model.hf_quantizer = None  # dequantised on load: what remains is a plain float model
    return CausalLM(path.stem, model.eval(), tokenizer)


@contextmanager
def quiet_gguf_reader() -> Iterator[None]:
    """Silence the progress bar transformers' GGUF reader draws on stderr while it dequantises.

    The reader uses tqdm directly, which `disable_progress_bar` does not reach; partita prints its
    own progress, and a second bar on stderr garbles `--json` runs and terminals alike.
    """
    try:
        from transformers import modeling_gguf_pytorch_utils as reader
    except ImportError:  # a transformers without GGUF support: nothing draws a bar
        yield
        return
    bar = getattr(reader, "tqdm", None)
    if bar is None:  # a later transformers that no longer uses tqdm there
        yield
        return
    reader.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        reader.tqdm = bar


def _tokenizer_class(transformers: Any, path: Path) -> Any:
    """The class tokenizer_config.json names, when transformers has it; else AutoTokenizer.

    AutoTokenizer prefers the model family's own tokenizer class to the one the directory names.
    """
    try:
        named = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):  # no (or an unreadable) config: let AutoTokenizer decide
        named = None
    found = getattr(transformers, named, None) if isinstance(named, str) and named.isidentifier() else None
    return found if found is not None and hasattr(found, "from_pretrained") else transformers.AutoTokenizer


# ------------------------------------------------------------------------ tiny random models

#: Words of the tiny models' word-level vocabulary (after the special tokens).
_WORDS = (
    "the of and to in is it that was for on are as with he they at be this from have or by one had not "
    "but what all were when we there can an your which their said if do will each about how up out them "
    "then she many some so these would other into has more her two like him see time could no make than "
    "first been its who now people my made over did down only way find use may water long little very "
    "after words called just where most know get through back much before go good new write our used me "
    "man too any day same right look think also around another came come work three word must because "
    "does part even place well such here take why things help put years different away again off went "
    "old number great tell men say small every found still between name should home big give air line "
    "set own under read last never us left end along while might next sound below saw something thought "
    "both few those always looked show large often together asked house world going want school important "
    "until form food keep children feet land side without boy once animals life enough took sometimes four "
    "head above kind began almost live page got earth need far hand high year mother light parts country"
).split()
SPECIAL = ("<unk>", "<s>", "</s>")
TINY_FAMILIES = ("llama", "qwen2", "gpt2")


def tiny_tokenizer() -> Any:
    """A word-level tokenizer over `_WORDS` (ids 0-2: <unk>, <s>, </s>), built offline."""
    transformers = _transformers()
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate((*SPECIAL, *dict.fromkeys(_WORDS)))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def save_tiny(path: str | os.PathLike, family: str = "llama", *, layers: int = 4, hidden: int = 64,
              seed: int = 0) -> Path:
    """Write a tiny random causal LM of `family` (llama, qwen2, gpt2) and its tokenizer to `path`.

    For tests and benchmarks on machines without a hub: a few layers, `hidden` wide, random
    weights from `seed`, loadable as `hf:PATH`. Returns the directory.
    """
    import torch

    transformers = _transformers()
    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    # Wider weights than the families' default (0.02) make random models pick varied tokens.
    common = {"vocab_size": vocab, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "initializer_range": 0.15}
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=512, **common)
    elif family == "qwen2":
        config = transformers.Qwen2Config(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          max_position_embeddings=512, tie_word_embeddings=True, **common)
    elif family == "gpt2":
        config = transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=4, n_positions=512, **common)
    else:
        raise ModelRefError(f"unknown tiny model family {family!r}; choose one of {', '.join(TINY_FAMILIES)}")
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    out = Path(path)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    # Without a class named, AutoTokenizer picks the family's own tokenizer class (e.g. Qwen2's BPE).
    config_file = out / "tokenizer_config.json"
    settings = json.loads(config_file.read_text())
    settings["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_file.write_text(json.dumps(settings, indent=2))
    return out
