"""
MiMo checkpoints (`TencentBAC/FastMTP`, `XiaomiMiMo/MiMo-7B-*`): a Qwen2 base and its MTP layer in one set of
weights. Loaded as a standard `Qwen2ForCausalLM` base and a FastMTP head.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from huggingface_hub import snapshot_download
from safetensors import SafetensorError, safe_open
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .draft_vocab import parse_vocab_map_filename
from .hub_files import HEAD_PREFIX, HUB_KWARGS, MIMO_MODEL_TYPE, local_draft_vocab_maps
from .transformers_compat import ignoring_unexpected_weights

if TYPE_CHECKING:
    from .modeling_fastmtp import FastMTPForCausalLM

MIMO_MTP_PREFIX = "model.mtp_layers."
MIMO_HEAD_PREFIX = "model." + HEAD_PREFIX
MIMO_ARCHITECTURE = "MiMoForCausalLM"
# Keys of a MiMo config.json that are not Qwen2 fields.
MIMO_ONLY_KEYS = ("model_type", "architectures", "auto_map", "num_nextn_predict_layers", "transformers_version")
# What a MiMo load needs from a Hub repo: configs, weights and vocabulary maps (not the tokenizer or training files).
MIMO_FILE_PATTERNS = [
    "config.json",
    "generation_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*freq_*.pt",
]
HUB_DOWNLOAD_KWARGS = ("cache_dir", "force_download", "local_files_only", "token")
# Bases SGLang's (and vLLM's) MiMo MTP paths can serve: MiMo's own architecture (their MTP layer is a Qwen2 layer).
SGLANG_BASE_TYPES = ("qwen2",)


class CheckpointError(OSError):
    """A checkpoint that is incomplete, corrupt or not what it claims to be."""


def load_mimo(
    cls: type[FastMTPForCausalLM],
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = "auto",
    device_map: Any = None,
    draft_vocab_maps: dict[str, str] | None = None,
    **kwargs,
) -> FastMTPForCausalLM:
    """
    A MiMo checkpoint as a FastMTP model: the base becomes a standard `Qwen2ForCausalLM` (no remote code) and
    `model.mtp_layers.0` the head. Further MTP layers are ignored: FastMTP applies one layer recursively. Vocabulary
    maps shipped in the checkpoint (`fr_zh/freq_zh_16384.pt`) and `draft_vocab_maps` end up in
    `config.draft_vocab_maps` as local paths. Called by `FastMTPForCausalLM.from_pretrained`.
    """
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    folder = checkpoint_folder(repo_or_dir, revision, hub_kwargs)
    mimo_config = read_mimo_config(folder)
    if (mimo_config.get("num_nextn_predict_layers") or 0) < 1:
        raise ValueError(
            f"{repo_or_dir} is a MiMo checkpoint without MTP layers (`num_nextn_predict_layers` is "
            f"{mimo_config.get('num_nextn_predict_layers')!r}): there is no head to draft with. Use a checkpoint "
            "that ships one (e.g. TencentBAC/FastMTP), or load it as a base and train a head with `fastmtp train`."
        )
    files = weight_map(folder)
    head_files = {name: file for name, file in files.items() if name.startswith(MIMO_HEAD_PREFIX)}
    if not head_files:
        raise ValueError(
            f"{repo_or_dir} declares {mimo_config['num_nextn_predict_layers']} MTP layer(s) but its weights have no "
            f"`{MIMO_HEAD_PREFIX}*` tensors: the MTP layer was stripped from this copy. Use the original checkpoint."
        )
    base = load_qwen2_base(folder, mimo_config, dtype, device_map, kwargs)
    config = cls.config_class(
        text_config=copy.deepcopy(base.config),
        base_model_name_or_path=str(repo_or_dir),
        base_model_revision=revision,
        draft_vocab_maps=local_draft_vocab_maps(
            find_vocab_maps(folder), draft_vocab_maps, folder, None, download_kwargs(hub_kwargs)
        ),
    )
    model = cls(config, base_model=base)
    model.load_head_state_dict(read_tensors(head_files))
    model.name_or_path = str(repo_or_dir)
    return model.eval()


def load_mimo_base(
    repo_or_dir: str | os.PathLike,
    *,
    revision: str | None = None,
    dtype: torch.dtype | str | None = "auto",
    device_map: Any = None,
    **kwargs,
) -> Qwen2ForCausalLM:
    """The Qwen2 base of a MiMo checkpoint, for a head-only repo that names one as its base."""
    hub_kwargs = {k: kwargs.pop(k) for k in HUB_KWARGS if k in kwargs}
    folder = checkpoint_folder(repo_or_dir, revision, hub_kwargs)
    mimo_config = read_mimo_config(folder)
    weight_map(folder)  # fails clearly on missing or truncated shards before Transformers reads them
    return load_qwen2_base(folder, mimo_config, dtype, device_map, kwargs)


def checkpoint_folder(repo_or_dir: str | os.PathLike, revision: str | None, hub_kwargs: dict) -> Path:
    """The local folder holding a checkpoint: the folder itself, or its snapshot in the Hugging Face cache."""
    if Path(repo_or_dir).is_dir():
        folder = Path(repo_or_dir)
    else:
        folder = Path(
            snapshot_download(
                str(repo_or_dir), revision=revision, allow_patterns=MIMO_FILE_PATTERNS, **download_kwargs(hub_kwargs)
            )
        )
    return folder / hub_kwargs.get("subfolder", "")


def download_kwargs(hub_kwargs: dict) -> dict:
    """The Hub arguments that huggingface_hub's download functions take (the subfolder is already applied)."""
    return {k: v for k, v in hub_kwargs.items() if k in HUB_DOWNLOAD_KWARGS}


def read_mimo_config(folder: Path) -> dict[str, Any]:
    config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    if config.get("model_type") != MIMO_MODEL_TYPE:
        raise CheckpointError(f"{folder} is not a MiMo checkpoint: its model_type is {config.get('model_type')!r}.")
    return config


def qwen2_config_from_mimo(mimo_config: dict[str, Any]) -> Qwen2Config:
    """MiMo's base is a plain Qwen2 model: its config is MiMo's without the MTP fields."""
    config = {k: v for k, v in mimo_config.items() if k not in MIMO_ONLY_KEYS}
    if config.get("rope_scaling", {}) is None:  # pre-v5 configs say "no scaling" this way; v5 warns about the key
        del config["rope_scaling"]
    return Qwen2Config.from_dict(config)


def load_qwen2_base(folder: Path, mimo_config: dict[str, Any], dtype, device_map, kwargs: dict) -> Qwen2ForCausalLM:
    """Transformers loads the base from the checkpoint's own shards; the MTP tensors are skipped, never read."""
    with mtp_weights_expected():
        base, loading_info = Qwen2ForCausalLM.from_pretrained(
            folder,
            config=qwen2_config_from_mimo(mimo_config),
            dtype=dtype,
            device_map=device_map,
            output_loading_info=True,
            **kwargs,
        )
    missing = sorted(loading_info["missing_keys"])
    if missing:
        raise CheckpointError(
            f"The MiMo checkpoint in {folder} lacks {len(missing)} base weights ({', '.join(missing[:4])}"
            f"{', ...' if len(missing) > 4 else ''}): it is incomplete. Download it again."
        )
    return base.eval()


@contextmanager
def mtp_weights_expected() -> Iterator[None]:
    """Keeps Transformers from reporting the MTP tensors of a MiMo checkpoint as unexpected when loading its base."""
    with ignoring_unexpected_weights(Qwen2ForCausalLM, "^" + re.escape(MIMO_MTP_PREFIX)):
        yield


def weight_map(folder: Path) -> dict[str, Path]:
    """
    Tensor name -> safetensors file, from a sharded checkpoint's index or its single weights file. Every file is
    checked (headers only) to be present and whole, so a broken download fails here with a clear message.
    """
    index_file = folder / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        index = json.loads(index_file.read_text(encoding="utf-8"))
        files = {name: folder / shard for name, shard in index["weight_map"].items()}
    elif (folder / SAFE_WEIGHTS_NAME).is_file():
        files = dict.fromkeys(safetensors_keys(folder / SAFE_WEIGHTS_NAME), folder / SAFE_WEIGHTS_NAME)
    else:
        raise CheckpointError(
            f"{folder} has no safetensors weights ({SAFE_WEIGHTS_NAME} or {SAFE_WEIGHTS_INDEX_NAME}); "
            "convert .bin checkpoints to safetensors first."
        )
    for shard in sorted(set(files.values())):
        if not shard.is_file():
            raise CheckpointError(
                f"{shard.name}, listed in {index_file.name}, is missing from {folder}: the download is incomplete. "
                "Download the checkpoint again."
            )
        safetensors_keys(shard)
    return files


def safetensors_keys(path: Path) -> list[str]:
    try:
        with safe_open(path, framework="pt") as file:
            return list(file.keys())
    except SafetensorError as error:
        raise CheckpointError(
            f"{path} is corrupt or truncated ({error}): delete it and download the checkpoint again."
        ) from error


def read_tensors(files: dict[str, Path]) -> dict[str, torch.Tensor]:
    """The named tensors, each read once, from the shards that hold them."""
    tensors = {}
    for shard in sorted(set(files.values())):
        with safe_open(shard, framework="pt") as file:
            tensors.update({name: file.get_tensor(name) for name, path in files.items() if path == shard})
    return tensors


def find_vocab_maps(folder: Path) -> dict[str, str]:
    """
    Vocabulary maps shipped in a checkpoint (`fr_zh/freq_zh_16384.pt`): language -> path relative to `folder`. Of
    several sizes for one language the largest is kept: maps list tokens most frequent first, so it holds the others.
    """
    found: dict[str, tuple[int, str]] = {}
    for path in folder.rglob("freq_*.pt"):
        parsed = parse_vocab_map_filename(path.name)
        if parsed and parsed[1] > found.get(parsed[0], (-1, ""))[0]:
            found[parsed[0]] = (parsed[1], path.relative_to(folder).as_posix())
    return {language: relative for language, (_, relative) in sorted(found.items())}
