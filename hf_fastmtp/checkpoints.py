"""
Checkpoint formats beyond the head-only folder: MiMo checkpoints (`TencentBAC/FastMTP`, `XiaomiMiMo/MiMo-7B-*`), whose
MTP layer sits beside a Qwen2 base in one set of weights; model cards for head repos; and export for SGLang, which
serves FastMTP heads at scale through its MiMo MTP path.

Not part of a head repo's remote code: `modeling_fastmtp` imports this module by name, only where it is needed.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import re
import shlex
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCardData, snapshot_download
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from transformers import AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase, Qwen2Config, Qwen2ForCausalLM
from transformers.utils import CONFIG_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

from .modeling_fastmtp import (
    HEAD_PREFIX,
    HUB_KWARGS,
    MIMO_MODEL_TYPE,
    FastMTPForCausalLM,
    local_draft_vocab_maps,
)
from .transformers_compat import ignoring_unexpected_weights

logger = logging.getLogger(__name__)

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
# FastMTP's and FR-Spec's vocabulary maps: `freq_<language>_<size>.pt`, a 1-D tensor of token ids.
VOCAB_MAP_NAME = re.compile(r"freq_(?P<language>[A-Za-z-]+)_(?P<size>\d+)\.pt")
# Bases SGLang's MiMo MTP path can serve: MiMo's own architecture.
SGLANG_BASE_TYPES = ("qwen2",)
# The configuration module MiMo checkpoints ship: SGLang loads the config with Transformers' remote code.
MIMO_CONFIG_MODULE = '''"""MiMo configuration: Qwen2's, plus the number of MTP layers stored beside the base."""

from transformers.models.qwen2.configuration_qwen2 import Qwen2Config


class MiMoConfig(Qwen2Config):
    model_type = "mimo"

    def __init__(self, *args, num_nextn_predict_layers=0, **kwargs):
        self.num_nextn_predict_layers = num_nextn_predict_layers
        super().__init__(*args, **kwargs)
'''


class CheckpointError(OSError):
    """A checkpoint that is incomplete, corrupt or not what it claims to be."""


# ----------------------------------------------------------------------------- MiMo checkpoints


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
        match = VOCAB_MAP_NAME.fullmatch(path.name)
        if match and int(match["size"]) > found.get(match["language"], (-1, ""))[0]:
            found[match["language"]] = (int(match["size"]), path.relative_to(folder).as_posix())
    return {language: relative for language, (_, relative) in sorted(found.items())}


def draft_vocab_map_paths(config: PretrainedConfig, folder: str | os.PathLike | None = None) -> dict[str, Path]:
    """
    `config.draft_vocab_maps` as local paths. A loaded model's maps are local already; paths relative to a model
    folder (as in a saved config.json) are resolved against `folder`.
    """
    maps = config.draft_vocab_maps or {}
    return {language: Path(folder or "", path).absolute() for language, path in maps.items()}


# ----------------------------------------------------------------------------- model cards


def model_card(config: PretrainedConfig, extra: dict[str, Any] | None = None) -> str:
    """
    README.md for a head repo: what the head is for, its training data, how well it drafts, how to load it.

    `extra` may give `repo_id`, `datasets` (names of the training data), `license`, `training` (the summary
    `fastmtp train` writes: data size, time, command) and `stats`: evaluation name -> a `FastMTPStats` or its
    `to_dict()`, shown as a table of tau and per-position acceptance.
    """
    extra = extra or {}
    repo_id = extra.get("repo_id", "path/to/this-head")
    base = config.base_model_name_or_path
    datasets = list(extra.get("datasets") or [])
    non_commercial = any("alpaca" in name.lower() for name in datasets)
    card_data = ModelCardData(
        base_model=base if base and not Path(base).exists() else None,
        datasets=datasets or None,
        license=extra.get("license") or ("cc-by-nc-4.0" if non_commercial else None),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["fastmtp", "speculative-decoding", "multi-token-prediction"],
    )
    base_text = f"`{base}`" + (f" (revision `{config.base_model_revision}`)" if config.base_model_revision else "")
    sections = [
        f"---\n{card_data.to_yaml()}\n---",
        f"# FastMTP head for {base or 'its base model'}",
        (
            "A [FastMTP](https://arxiv.org/abs/2509.18362) multi-token-prediction head: one decoder layer that drafts "
            f"{config.num_draft_tokens} tokens per step for {base_text if base else 'its base model'}, which verifies "
            "them in one forward pass. The output is exactly the base model's (greedy: token for token; sampling: "
            "the same distribution), only faster. This repo holds only the head; loading it loads the base model too."
        ),
        "## Training data\n\n" + ("\n".join(f"- {name}" for name in datasets) if datasets else "Not recorded."),
    ]
    if non_commercial:
        sections.append(
            "**Licence:** the training data includes Alpaca-derived prompts (CC BY-NC 4.0), so this head is for "
            "non-commercial use only."
        )
    if extra.get("training"):
        sections.append(training_section(extra["training"]))
    if extra.get("stats"):
        sections.append(stats_table(extra["stats"]))
    sections.append(usage_section(repo_id, base, config))
    return "\n\n".join(sections) + "\n"


def training_section(summary: dict[str, Any]) -> str:
    """How the head was trained, from `fastmtp train`'s training_summary.json: enough to reproduce and judge it."""
    stages = [summary]
    while stages[0].get("initialised_from"):
        stages.insert(0, stages[0]["initialised_from"])
    if len(stages) == 1:
        return "\n".join(["## Training", "", *stage_lines(summary)])
    hours = sum(stage["seconds"] for stage in stages) / 3600
    lines = [
        "## Training",
        "",
        f"In {len(stages)} stages ({hours:.2f} h in all), each continuing from the head of the last.",
    ]
    for number, stage in enumerate(stages, 1):
        lines += ["", f"### Stage {number}", "", *stage_lines(stage)]
    return "\n".join(lines)


def stage_lines(summary: dict[str, Any]) -> list[str]:
    """One `fastmtp train` run: data, steps, time, objective, held-out accuracy and the command line."""
    rows, tokens = summary["rows"], summary["response_tokens"]
    weights = " / ".join(f"{w:.2f}" for w in summary["loss_weights"])
    hardware = f" on {summary['hardware']}" if summary.get("hardware") else ""
    lines = [
        f"- Data: {rows['train']:,} rows ({tokens['train']:,} response tokens) for training, {rows['validation']:,} "
        f"rows ({tokens['validation']:,} response tokens) held out.",
        f"- {summary['steps']:,} optimizer step{'' if summary['steps'] == 1 else 's'} ({summary['epochs']:.2f} epochs) "
        f"in {summary['seconds'] / 3600:.2f} h{hardware} ({summary['train_tokens_per_second']:.0f} response tokens/s); "
        f"loss weights per draft step {weights}.",
    ]
    config = summary.get("config") or {}
    targets = "the base model's greedy choices" if config.get("labels") == "base" else "the data's next tokens"
    objective = [f"targets: {targets}"]
    if config.get("feature_weight"):
        objective.append(f"feature regression weight {config['feature_weight']}")
    if config.get("loss_vocab_size"):
        objective.append(f"cross-entropy over the {config['loss_vocab_size']:,} most frequent response tokens")
    if config.get("init"):
        objective.append(f"initialisation: {config['init']}")
    lines.append(f"- Objective: {'; '.join(objective)}.")
    distilled_by = summary.get("distilled_by")
    if distilled_by:
        sampling = ", ".join(f"{key} {value}" for key, value in (distilled_by.get("sampling") or {}).items())
        lines.insert(0, f"- Self-distilled: the answers are {distilled_by['model']}'s own ({sampling}).")
    validation = summary.get("final_validation")
    if validation:
        accuracy = " / ".join(f"{a:.1%}" for a in validation["val_accuracy"])
        lines.append(
            f"- Held-out teacher-forced top-1 accuracy per draft step: {accuracy} (tau estimate "
            f"{summary['tau_estimate']:.2f})."
        )
    return [*lines, "", "```bash", summary["command"], "```"]


def stats_table(stats: dict[str, Any]) -> str:
    rows = ["| evaluation | K | tau | acceptance per position |", "|---|---|---|---|"]
    for name, run in stats.items():
        run = run.to_dict() if hasattr(run, "to_dict") else run
        acceptance = " / ".join(f"{rate:.0%}" for rate in run["acceptance_cumulative"])
        rows.append(f"| {name} | {run['num_draft_tokens']} | {run['tau']:.2f} | {acceptance} |")
    return (
        "## Acceptance\n\n" + "\n".join(rows) + "\n\ntau: mean tokens per base-model forward pass (accepted drafts "
        "plus the base model's own token). Acceptance at position k: share of cycles whose first k drafts were all "
        "accepted."
    )


def usage_section(repo_id: str, base: str | None, config: PretrainedConfig) -> str:
    text = f"""## Usage

```python
from hf_fastmtp import FastMTPForCausalLM
from transformers import AutoTokenizer

model = FastMTPForCausalLM.from_pretrained("{repo_id}")  # loads the base model too
tokenizer = AutoTokenizer.from_pretrained("{base or "BASE_MODEL"}")
messages = [{{"role": "user", "content": "Why is the sky blue?"}}]
inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
output = model.generate(**inputs, max_new_tokens=256, fastmtp=True)
print(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```

Without hf_fastmtp installed, Transformers loads it with the code in this repo:

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("{repo_id}", trust_remote_code=True)
```"""
    if config.draft_vocab_maps:
        text += (
            "\n\nDrafting is restricted to the frequent tokens of the prompt's language "
            f"(vocabulary maps: {', '.join(sorted(config.draft_vocab_maps))}); verification always uses the full "
            "vocabulary."
        )
    if config.text_config.model_type in SGLANG_BASE_TYPES:
        text += (
            "\n\nTo serve it at scale with SGLang: `fastmtp export --format sglang --head "
            f"{repo_id} --output DIR` writes a MiMo-style checkpoint and prints the launch command."
        )
    return text


# ----------------------------------------------------------------------------- SGLang export


def export_sglang(
    model: FastMTPForCausalLM,
    output_dir: str | os.PathLike,
    *,
    token_map: str | None = None,
    tokenizer: PreTrainedTokenizerBase | str | os.PathLike | None = None,
) -> str:
    """
    Writes `model` as a MiMo checkpoint (its Qwen2 base plus the head as `model.mtp_layers.0`), which SGLang serves
    with EAGLE speculative decoding through its MiMo MTP path, and returns the command that launches the server.

    `token_map` picks the vocabulary map SGLang drafts over (one for all prompts; default: `default_draft_vocab`, or
    the only map). The tokenizer (default: the base model's) is saved beside the weights, where SGLang looks for it.
    """
    check_servable_by_sglang(model)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()):
        raise FileExistsError(f"{output_dir} is not empty: export writes a whole checkpoint; choose a new folder.")
    model.model.save_pretrained(output_dir)
    add_head_shard(model, output_dir)
    write_mimo_config(output_dir)
    token_map_file = write_token_map(model, token_map, output_dir)
    save_tokenizer(tokenizer or model.config.base_model_name_or_path, output_dir)
    return sglang_command(output_dir, model.config.num_draft_tokens, token_map_file)


def check_servable_by_sglang(model: FastMTPForCausalLM) -> None:
    model_type = model.model.config.model_type
    if model_type not in SGLANG_BASE_TYPES:
        raise ValueError(
            f"SGLang serves FastMTP heads through its MiMo MTP path, which supports Qwen2-architecture bases only "
            f"(model_type {', '.join(map(repr, SGLANG_BASE_TYPES))}: MiMo, Qwen2, Qwen2.5); this base is "
            f"{model_type!r} ({type(model.model).__name__}). Serve it with `generate(fastmtp=True)` in Transformers."
        )


def add_head_shard(model: FastMTPForCausalLM, output_dir: Path) -> None:
    """Adds the head as `model.mtp_layers.0.*` in a shard of its own and renames all shards into one indexed set."""
    index_file = output_dir / SAFE_WEIGHTS_INDEX_NAME
    if index_file.is_file():
        base_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
    else:
        base_map = dict.fromkeys(safetensors_keys(output_dir / SAFE_WEIGHTS_NAME), SAFE_WEIGHTS_NAME)
    base_shards = sorted(set(base_map.values()))
    count = len(base_shards) + 1
    names = {shard: f"model-{i:05d}-of-{count:05d}.safetensors" for i, shard in enumerate(base_shards, start=1)}
    for shard, name in names.items():
        (output_dir / shard).rename(output_dir / name)
    head_shard = f"model-{count:05d}-of-{count:05d}.safetensors"
    head = {MIMO_HEAD_PREFIX + name: t.detach().contiguous().cpu() for name, t in model.head.state_dict().items()}
    save_file(head, output_dir / head_shard, metadata={"format": "pt"})
    files = {**{name: names[shard] for name, shard in base_map.items()}, **dict.fromkeys(head, head_shard)}
    total_size = sum(tensor_bytes(output_dir / shard) for shard in [*names.values(), head_shard])
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(files.items()))}
    index_file.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def tensor_bytes(path: Path) -> int:
    """Bytes of tensor data in a safetensors file: all of it but the 8-byte length and the JSON header."""
    with open(path, "rb") as file:
        (header_size,) = struct.unpack("<Q", file.read(8))
    return path.stat().st_size - 8 - header_size


def write_mimo_config(output_dir: Path) -> None:
    """Turns the saved Qwen2 config.json into MiMo's, with the pre-v5 field names SGLang's Transformers reads."""
    config_file = output_dir / CONFIG_NAME
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config.update(
        model_type=MIMO_MODEL_TYPE,
        architectures=[MIMO_ARCHITECTURE],
        num_nextn_predict_layers=1,
        auto_map={"AutoConfig": "configuration_mimo.MiMoConfig"},
    )
    rope = config.get("rope_parameters") or {}
    config.setdefault("torch_dtype", config.get("dtype"))
    config.setdefault("rope_theta", rope.get("rope_theta"))
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", {k: v for k, v in rope.items() if k != "rope_theta"})
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    (output_dir / "configuration_mimo.py").write_text(MIMO_CONFIG_MODULE, encoding="utf-8")


def write_token_map(model: FastMTPForCausalLM, key: str | None, output_dir: Path) -> Path | None:
    """Writes the vocabulary map SGLang will draft over (`--speculative-token-map`); `None` if the head has none."""
    maps = model.draft_vocab_maps
    if key is None:
        if not maps:
            return None
        if model.config.default_draft_vocab in maps:
            key = model.config.default_draft_vocab
        elif len(maps) == 1:
            key = next(iter(maps))
        else:
            raise ValueError(
                f"The model has vocabulary maps for {sorted(maps)} and SGLang drafts over one: choose it with "
                "--token-map (`token_map=`)."
            )
    if key not in maps:
        raise ValueError(f"No vocabulary map {key!r}: the model has {sorted(maps) or 'none'}.")
    target = output_dir / f"freq_{key}_{maps[key].numel()}.pt"
    torch.save(maps[key].cpu().clone(), target)
    return target


def save_tokenizer(source: PreTrainedTokenizerBase | str | os.PathLike | None, output_dir: Path) -> None:
    if not isinstance(source, PreTrainedTokenizerBase):
        try:
            # Never prompts: a MiMo checkpoint's config names remote code, which its (Qwen2) tokenizer does not need.
            source = AutoTokenizer.from_pretrained(source, trust_remote_code=False)
        except (OSError, ValueError, TypeError, KeyError) as error:
            logger.warning(
                "No tokenizer found at %s (%s): copy the base model's tokenizer into %s, or pass --tokenizer-path "
                "to SGLang.",
                source,
                error,
                output_dir,
            )
            return
    source.save_pretrained(output_dir)


def sglang_command(model_dir: Path, num_draft_tokens: int, token_map: Path | None) -> str:
    """SGLang's launch command for FastMTP: K recursive steps of the one MTP layer, a chain (top-1) of K drafts."""
    arguments = [
        "python -m sglang.launch_server",
        f"--model-path {shlex.quote(str(model_dir))}",
        "--speculative-algorithm EAGLE",
        f"--speculative-num-steps {num_draft_tokens}",
        "--speculative-eagle-topk 1",
        f"--speculative-num-draft-tokens {num_draft_tokens + 1}",
    ]
    if token_map is not None:
        arguments.append(f"--speculative-token-map {shlex.quote(str(token_map))}")
    arguments.append("--trust-remote-code")
    return " ".join(arguments)


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `export` subcommand to the `fastmtp` command line."""
    parser = commands.add_parser(
        "export",
        help="write a checkpoint for serving at scale (SGLang) and print its launch command",
        description="Writes the head and its base as a MiMo-style checkpoint (base weights plus model.mtp_layers.0) "
        "that SGLang serves with EAGLE speculative decoding, and prints the command that launches it. SGLang's MiMo "
        "MTP path takes Qwen2-architecture bases only.",
    )
    parser.add_argument("--format", choices=["sglang"], required=True, help="serving engine to export for")
    parser.add_argument("--output", required=True, help="new or empty folder for the checkpoint")
    parser.add_argument(
        "--head", help="FastMTP head folder or Hub repo, or a MiMo checkpoint (e.g. TencentBAC/FastMTP)"
    )
    parser.add_argument("--base", help="base model folder or Hub id (default: the base the head names)")
    parser.add_argument(
        "--token-map", help="language of the vocabulary map to serve with (default: the head's default)"
    )
    parser.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> None:
    if args.head is None:
        raise SystemExit(
            "fastmtp export: pass --head (a head folder or repo, or a MiMo checkpoint such as TencentBAC/FastMTP). "
            "The embedded default (SmolLM2, a Llama model) cannot be served by SGLang's MiMo MTP path."
        )
    model = FastMTPForCausalLM.from_pretrained(args.head, base_model=args.base)
    try:
        command = export_sglang(model, args.output, token_map=args.token_map, tokenizer=args.base)
    except (ValueError, FileExistsError) as error:
        raise SystemExit(f"fastmtp export: {error}") from error
    print(f"Wrote a MiMo-style checkpoint to {args.output}. Launch SGLang with:\n\n    {command}\n")


__all__ = [
    "CheckpointError",
    "draft_vocab_map_paths",
    "export_sglang",
    "find_vocab_maps",
    "load_mimo",
    "load_mimo_base",
    "model_card",
    "register_cli",
]
