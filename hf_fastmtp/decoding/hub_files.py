"""
The files of a head folder or Hub repo: where they are (a local folder or the Hugging Face cache), the head's
weights, its vocabulary maps, and the base model it names.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, OfflineModeIsEnabled
from safetensors import SafetensorError
from safetensors.torch import load_file
from transformers.utils import CONFIG_NAME

from .draft_vocab import vocab_map_filename

HEAD_WEIGHTS_NAME = "model.safetensors"
HEAD_PREFIX = "mtp_layers.0."
MIMO_MODEL_TYPE = "mimo"
# Vocabulary maps are saved under this folder of a head folder.
VOCAB_DIR = "vocab"
HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "proxies", "subfolder")


def resolve_file(repo_or_dir: str | os.PathLike, filename: str, revision: str | None, hub_kwargs: dict) -> str:
    """Path of `filename` in a local folder, or in the Hugging Face cache for a Hub repo (downloaded if needed)."""
    local = Path(repo_or_dir) / hub_kwargs.get("subfolder", "") / filename
    if Path(repo_or_dir).is_dir():
        if not local.is_file():
            raise FileNotFoundError(f"{local} is missing: {repo_or_dir} has no {filename}.")
        return str(local)
    return hf_hub_download(str(repo_or_dir), filename, revision=revision, **hub_kwargs)


def read_safetensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, json.JSONDecodeError) as error:
        raise OSError(
            f"Could not read the weights in {path}: the file is corrupt or truncated ({error}). "
            "Delete it and download or save it again."
        ) from error


def is_mimo_config(config_file: str | os.PathLike) -> bool:
    with open(config_file, encoding="utf-8") as file:
        return json.load(file).get("model_type") == MIMO_MODEL_TYPE


def resolve_base_config(base_id: str | os.PathLike, revision: str | None, hub_kwargs: dict) -> str:
    """The base model's config.json, or an error that names the base and the way to pass another one."""
    how_to_pass = (
        "pass the base to `from_pretrained` as `base_model=` (a loaded model, a local folder or a Hub id), "
        "e.g. `FastMTPForCausalLM.from_pretrained(head, base_model=...)`"
    )
    looks_local = Path(base_id).is_absolute() or str(base_id).startswith((".", "~"))
    if looks_local and not Path(base_id).expanduser().is_dir():
        raise FileNotFoundError(f"The head's base model folder {str(base_id)!r} does not exist: {how_to_pass}.")
    try:
        return resolve_file(Path(base_id).expanduser() if looks_local else base_id, CONFIG_NAME, revision, hub_kwargs)
    except HFValidationError as error:
        raise FileNotFoundError(
            f"The head's base model {str(base_id)!r} is neither a local folder nor a Hub repo id: {how_to_pass}."
        ) from error
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as error:
        raise OSError(
            f"The head's base model {str(base_id)!r} is not in the Hugging Face cache, and the Hub cannot be reached "
            f"(offline, or HF_HUB_OFFLINE=1). Download it once while online, or {how_to_pass}."
        ) from error


def local_draft_vocab_maps(
    saved: dict[str, str] | None,
    extra: dict[str, str] | None,
    repo_or_dir: str | os.PathLike,
    revision: str | None,
    hub_kwargs: dict,
) -> dict[str, str] | None:
    """
    Every vocabulary map as a local file: `saved` ones (paths in a config.json, relative to its folder or repo, or
    already local) are resolved or downloaded; `extra` ones are local files or `"repo_id:filename"` on the Hub.
    """
    maps = {
        language: path if Path(path).is_absolute() else resolve_file(repo_or_dir, path, revision, hub_kwargs)
        for language, path in (saved or {}).items()
    }
    maps.update({language: resolve_vocab_map_source(source, hub_kwargs) for language, source in (extra or {}).items()})
    return maps or None


def resolve_vocab_map_source(source: str | os.PathLike, hub_kwargs: dict) -> str:
    """A vocabulary map given by the user: a local file, or `"repo_id:filename"` on the Hub."""
    if Path(source).is_file():
        return str(Path(source).absolute())  # not resolved: a Hub cache's symlink keeps the map's file name
    repo_id, separator, filename = str(source).partition(":")
    if not separator or not repo_id or not filename:
        raise FileNotFoundError(f"Vocabulary map {source!r} is neither a local file nor 'repo_id:filename'.")
    return hf_hub_download(repo_id, filename, **{k: v for k, v in hub_kwargs.items() if k != "subfolder"})


def save_vocab_maps(maps: dict[str, torch.LongTensor], folder: Path) -> dict[str, str] | None:
    """Writes each map as `vocab/freq_<key>_<size>.pt`; returns the maps' paths relative to `folder`."""
    if not maps:
        return None
    (folder / VOCAB_DIR).mkdir(exist_ok=True)
    saved = {}
    for key, token_ids in maps.items():
        saved[key] = f"{VOCAB_DIR}/{vocab_map_filename(key, token_ids.numel())}"
        torch.save(token_ids.cpu().clone(), folder / saved[key])
    return saved
