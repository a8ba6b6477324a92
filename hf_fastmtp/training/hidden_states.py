"""The base model's hidden states, computed once per row and cached on disk for every epoch and run."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
)

from ..decoding.atomic_files import replaced_atomically
from .data import Example
from .objective import IGNORE_INDEX

# Padded tokens per base-model forward when precomputing hidden states.
PRECOMPUTE_BATCH_TOKENS = 8192
# Rows per hidden-state file: an interrupted precompute loses at most one chunk's work.
ROWS_PER_CHUNK = 128
# Batches drawn per length-sorting window: little padding, yet a different mix of rows every epoch.
SORT_WINDOW_BATCHES = 50

logger = logging.getLogger(__name__)


class HiddenStateStore:
    """
    The base model's final hidden states h_0..h_{len-3} of each example ([num_pairs, H]; for a head with
    `feature_layers`, those layers' [num_pairs, layers, H]), read from the precomputed chunk files.
    """

    def __init__(self, paths: Sequence[Path], rows_per_chunk: int):
        self.paths = list(paths)
        self.rows_per_chunk = rows_per_chunk

    def __getitem__(self, index: int) -> torch.Tensor:
        chunk, row = divmod(index, self.rows_per_chunk)
        # Opened per read (reading only the row's bytes): cheap next to a training step, and no file handles pile up.
        with safe_open(self.paths[chunk], framework="pt") as file:
            return file.get_tensor(str(row))


def precompute_hidden_states(
    base: PreTrainedModel,
    examples: Sequence[Example],
    folder: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float16,
    rows_per_chunk: int = ROWS_PER_CHUNK,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    feature_layers: Sequence[int] | None = None,
) -> HiddenStateStore:
    """
    Computes the base model's final hidden states (or, for a head with `feature_layers`, those layers' hidden states,
    indices from 0 to `num_hidden_layers`) once for all `examples` and stores them in `folder`, chunk by chunk.

    The base is frozen, so these are what it would compute at every epoch, exactly up to the storage `dtype`. A chunk
    file records a digest of the base model, of the layers stored and of its rows: a rerun keeps the chunks that still
    match (resuming an interrupted precompute) and recomputes the others. Processes share the chunks round-robin; the
    caller waits for all of them before reading (`accelerator.wait_for_everyone()`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_digest = base_fingerprint(base)
    chunks = [examples[start : start + rows_per_chunk] for start in range(0, len(examples), rows_per_chunk)]
    paths = [folder / f"chunk-{index:05d}.safetensors" for index in range(len(chunks))]
    todo = []
    for index in range(process_index, len(chunks), num_processes):
        digest = chunk_digest(base_digest, dtype, chunks[index], feature_layers)
        if stored_digest(paths[index]) != digest:
            todo.append((index, digest))
    total_tokens = sum(example.num_pairs for index, _ in todo for example in chunks[index])
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="base hidden states", disable=not progress) as bar:
        for index, digest in todo:
            tensors = {}
            for row, hidden in base_hidden_states(base, chunks[index], feature_layers):
                tensors[str(row)] = hidden.to(dtype).contiguous()
                bar.update(hidden.shape[0])
            with replaced_atomically(paths[index]) as staging:
                save_file(tensors, staging, metadata={"digest": digest})
    return HiddenStateStore(paths, rows_per_chunk)


@torch.inference_mode()
def base_hidden_states(
    base: PreTrainedModel, examples: Sequence[Example], feature_layers: Sequence[int] | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """
    `(row, hidden states [num_pairs, H])` for each example, or with `feature_layers` those layers' hidden states
    `[num_pairs, layers, H]`, from length-sorted, right-padded batches.
    """
    decoder = base.get_decoder()
    order = sorted(range(len(examples)), key=lambda row: examples[row].num_pairs)
    batches, batch = [], []
    for row in order:
        if batch and (len(batch) + 1) * examples[row].num_pairs > PRECOMPUTE_BATCH_TOKENS:
            batches.append(batch)
            batch = []
        batch.append(row)
    batches.append(batch)
    for batch in batches:
        # h_p for p <= len-3 only depends on the tokens up to there: the last two tokens need no forward.
        width = examples[batch[-1]].num_pairs
        input_ids = torch.zeros(len(batch), width, dtype=torch.long)
        attention_mask = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            length = examples[row].num_pairs
            input_ids[i, :length] = torch.tensor(examples[row].input_ids[:length])
            attention_mask[i, :length] = 1
        outputs = decoder(
            input_ids=input_ids.to(base.device),
            attention_mask=attention_mask.to(base.device),
            use_cache=False,
            output_hidden_states=feature_layers is not None,
        )
        if feature_layers is None:
            hidden = outputs.last_hidden_state
        else:
            hidden = torch.stack([outputs.hidden_states[layer] for layer in feature_layers], dim=-2)
        for i, row in enumerate(batch):
            yield row, hidden[i, : examples[row].num_pairs].cpu()


def base_fingerprint(base: PreTrainedModel) -> str:
    """A cheap digest of the base model's identity: its config and its first and last decoder layers and final norm."""
    decoder = base.get_decoder()
    digest = hashlib.sha256(base.config.to_json_string(use_diff=False).encode("utf-8"))
    for module in (decoder.layers[0], decoder.layers[-1], decoder.norm):
        for tensor in module.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def chunk_digest(
    base_digest: str, dtype: torch.dtype, examples: Sequence[Example], feature_layers: Sequence[int] | None = None
) -> str:
    """Identifies a chunk's contents: a chunk stored for other layers (or the final state alone) is never reused."""
    layers = "" if feature_layers is None else f"/layers={list(feature_layers)}"
    digest = hashlib.sha256(f"{base_digest}/{dtype}{layers}".encode())
    for example in examples:
        digest.update(json.dumps(example.input_ids).encode())
    return digest.hexdigest()[:16]


def stored_digest(path: Path) -> str | None:
    if not path.is_file():
        return None
    try:
        with safe_open(path, framework="pt") as file:
            return (file.metadata() or {}).get("digest")
    except (SafetensorError, OSError):  # a corrupt chunk is recomputed
        return None


class PairDataset(Dataset):
    """Examples and their cached hidden states; `collate_pairs` makes the batches."""

    def __init__(self, examples: Sequence[Example], indices: Sequence[int], store: HiddenStateStore):
        self.examples = examples
        self.indices = list(indices)
        self.store = store

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Example, torch.Tensor]:
        index = self.indices[item]
        return self.examples[index], self.store[index]


def collate_pairs(items: Sequence[tuple[Example, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """
    Right-padded pairs: `hidden_states` h_p [B, T, H], `input_ids` t_{p+1}, `labels` t_{p+2} (IGNORE_INDEX outside the
    response and on padding), `pair_mask` (True on real pairs); from feature layers' states also `features`, the
    layers' states concatenated [B, T, layers * H] (the final one, `hidden_states`, last).
    """
    width = max(example.num_pairs for example, _ in items)
    hidden_states = torch.zeros(len(items), width, *items[0][1].shape[1:], dtype=items[0][1].dtype)
    input_ids = torch.zeros(len(items), width, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
    pair_mask = torch.zeros(len(items), width, dtype=torch.bool)
    for row, (example, hidden) in enumerate(items):
        length = example.num_pairs
        ids = torch.tensor(example.input_ids)
        hidden_states[row, :length] = hidden
        input_ids[row, :length] = ids[1:-1]
        labels[row, :length] = ids[2:]
        # Label t_{p+2} counts only inside the response: p + 2 >= prompt_length.
        labels[row, : max(example.prompt_length - 2, 0)] = IGNORE_INDEX
        pair_mask[row, :length] = True
    batch = {"hidden_states": hidden_states, "input_ids": input_ids, "labels": labels, "pair_mask": pair_mask}
    if hidden_states.ndim == 4:
        batch.update(hidden_states=hidden_states[:, :, -1], features=hidden_states.flatten(2))
    return batch


class LengthGroupedBatches:
    """
    Batches of similar lengths, in an order drawn from `seed` and `epoch`: rows are shuffled, sorted by length within
    windows of a few dozen batches, cut into batches, and the batches shuffled. Set `epoch` before iterating.
    """

    drop_last = False  # read by accelerate when it shards the batches over processes

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        rng = random.Random(f"{self.seed}/{self.epoch}")
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        window = self.batch_size * SORT_WINDOW_BATCHES
        batches = []
        for start in range(0, len(order), window):
            rows = sorted(order[start : start + window], key=self.lengths.__getitem__)
            batches += [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        rng.shuffle(batches)
        return iter(batches)
