"""GGUF checkpoints (llama.cpp's format) turned into ordinary HF model dirs.

Many small instruct models are published, or only easy to get, as a ``.gguf`` file. emscope's
hooks, adapters and geometry work on a plain ``*ForCausalLM`` with safetensors weights, so
:func:`convert_gguf` dequantises the file once with transformers (``gguf_file=``, which needs
the ``gguf`` package: ``pip install 'emscope[gguf]'``) and saves the model, its tokenizer and
its chat template as a normal model dir that :func:`emscope.models.load_model` reads.

The weights are the dequantised GGUF weights (a Q4 file gives a float model with Q4's rounding
in it, not the original checkpoint). ``gguf_source.json`` in the output records the file, its
sha256, its architecture and the versions used.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from emscope.errors import EmscopeError
from emscope.io import package_version

#: Written beside the weights: where the model came from.
SOURCE_FILE = "gguf_source.json"

#: GGUF ``general.architecture`` names that transformers renames before looking them up
#: (``load_gguf_checkpoint``), so they are supported when their new name is.
_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}

_DTYPES = ("float32", "bfloat16", "float16")


def require_gguf() -> Any:
    """The ``gguf`` package, or one line saying how to install it."""
    from transformers.utils.import_utils import is_gguf_available

    try:  # the minimum transformers asks for (a constant of its internals: guarded)
        from transformers.utils.import_utils import GGUF_MIN_VERSION
    except ImportError:  # pragma: no cover
        GGUF_MIN_VERSION = "0.10.0"
    try:
        import gguf
    except ImportError:
        raise EmscopeError(
            "reading a GGUF file needs the gguf package: pip install 'emscope[gguf]'"
        ) from None
    if not is_gguf_available(GGUF_MIN_VERSION):
        version = package_version("gguf") or "an old version"
        raise EmscopeError(
            f"transformers needs gguf>={GGUF_MIN_VERSION} to read GGUF files (installed: "
            f"{version}): pip install -U gguf"
        )
    return gguf


def transformers_gguf_architectures() -> frozenset[str] | None:
    """The GGUF ``general.architecture`` values the installed transformers can dequantise
    (``None`` when this transformers does not publish the list)."""
    try:
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    except ImportError:  # pragma: no cover - present in every supported transformers
        return None
    return frozenset(GGUF_SUPPORTED_ARCHITECTURES)


def gguf_architecture(path: str | Path) -> str:
    """``general.architecture`` of a GGUF file (read from its header, no tensor loaded)."""
    path = Path(path)
    _check_magic(path)
    gguf = require_gguf()
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        value = field.contents() if field is not None else None
    except (ValueError, OSError, IndexError, KeyError) as exc:
        raise EmscopeError(f"{path}: not a readable GGUF file ({exc})") from None
    if not isinstance(value, str) or not value:
        raise EmscopeError(f"{path}: GGUF file without general.architecture")
    return value


def _check_magic(path: Path) -> None:
    if not path.is_file():
        raise EmscopeError(f"{path}: GGUF file not found")
    try:
        with path.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise EmscopeError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if magic != b"GGUF":
        raise EmscopeError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")


def check_architecture(path: str | Path) -> str:
    """The file's architecture, refused in one line when transformers cannot dequantise it."""
    arch = gguf_architecture(path)
    supported = transformers_gguf_architectures()
    if supported is not None and arch not in supported and _ALIASES.get(arch) not in supported:
        import transformers

        raise EmscopeError(
            f"{path}: GGUF architecture {arch!r} cannot be dequantised by transformers "
            f"{transformers.__version__} (it reads: {', '.join(sorted(supported))})"
        )
    return arch


def _check_dtype(dtype: str) -> None:
    if dtype not in _DTYPES:
        raise EmscopeError(f"unknown dtype {dtype!r}; expected one of {', '.join(_DTYPES)}")


def _check_out_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise EmscopeError(f"{out}: exists and is not a dir")
    if out.is_dir() and any(out.iterdir()):
        raise EmscopeError(f"{out}: exists and is not empty (choose a new output dir)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _drop_quantizer(model: Any) -> None:
    """Clear the marks transformers leaves on a GGUF-loaded model: its weights are plain
    floats already, but ``save_pretrained`` refuses a model that still names a quantizer."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model, "is_quantized", False):
        model.is_quantized = False
    if hasattr(model, "quantization_method"):
        del model.quantization_method
    for config in (model.config, getattr(model.config, "text_config", None)):
        if config is not None and hasattr(config, "quantization_config"):
            del config.quantization_config


def load_gguf(path: str | Path, *, dtype: str = "float32") -> tuple[Any, Any]:
    """``(model, tokenizer)`` as transformers loads a GGUF file (``gguf_file=``), float
    weights in ``dtype``; refused in one line when transformers cannot read it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    _check_dtype(dtype)
    check_architecture(path)
    torch_dtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch_dtype, trust_remote_code=False
        )
        tokenizer = AutoTokenizer.from_pretrained(
            str(path.parent), gguf_file=path.name, trust_remote_code=False
        )
    except (ValueError, KeyError, NotImplementedError, OSError, TypeError) as exc:
        raise EmscopeError(f"{path}: transformers cannot load it: {_first_line(exc)}") from None
    model.eval()
    return model, tokenizer


def convert_gguf(path: str | Path, out_dir: str | Path, *, dtype: str = "float32") -> Path:
    """Dequantise the GGUF file ``path`` and save it as an HF model dir ``out_dir``.

    ``out_dir`` gets ``config.json``, ``generation_config.json``, ``model.safetensors``, the
    tokenizer files (with the file's chat template) and :data:`SOURCE_FILE`. It must not
    exist or be empty; it is written as a sibling temp dir renamed into place, so it either
    holds the whole model or nothing. Bad input (no such file, not a GGUF, an architecture
    the installed transformers cannot dequantise, no ``gguf`` package, an unknown ``dtype``)
    raises :class:`EmscopeError` before anything is written. Returns ``out_dir``.
    """
    import transformers

    path = Path(path)
    out = Path(out_dir)
    start = time.perf_counter()
    _check_dtype(dtype)
    _check_out_dir(out)
    arch = check_architecture(path)
    model, tokenizer = load_gguf(path, dtype=dtype)
    _drop_quantizer(model)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        from emscope.io import read_json, umask, write_json

        os.chmod(tmp, 0o777 & ~umask())
        try:
            model.save_pretrained(str(tmp))
        except ValueError as exc:  # a quantizer mark this transformers keeps elsewhere
            raise EmscopeError(
                f"{path}: transformers {transformers.__version__} will not save the dequantised "
                f"model ({_first_line(exc)}); emscope.models_gguf._drop_quantizer does not "
                "clear what this release marks"
            ) from None
        tokenizer.save_pretrained(str(tmp))
        for file in tmp.iterdir():  # safetensors writes 0600; give what a plain open gives
            os.chmod(file, 0o666 & ~umask())
        if "quantization_config" in read_json(tmp / "config.json"):
            raise EmscopeError(
                f"{path}: the converted config.json still names a quantizer (transformers "
                f"{transformers.__version__}); emscope.models_gguf._drop_quantizer needs updating"
            )
        write_json(
            tmp / SOURCE_FILE,
            {
                "gguf_file": path.name,
                "sha256": _sha256(path),
                "architecture": arch,
                "model_type": model.config.model_type,
                "dtype": dtype,
                "transformers": transformers.__version__,
                "gguf": package_version("gguf"),
                "seconds": round(time.perf_counter() - start, 1),
            },
        )
        try:  # rename(2) replaces an empty dir, and fails on one another process filled
            os.replace(tmp, out)
        except OSError:
            _check_out_dir(out)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
