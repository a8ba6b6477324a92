"""
`fastmtp train`: trains a FastMTP head on self-distilled data, with the base model frozen.

The objective is FastMTP's: K-step recursive teacher forcing with one shared head, loss `sum_k alpha_k CE_k`,
`alpha_k = beta^(k-1) / sum_j beta^(j-1)`, on response tokens only. Training runs the recursion exactly as drafting
does (`recursive_head_outputs`): step k reads step k-1's output one position to the left, and attends to what the
head's KV cache holds when it drafts at inference time, which a custom attention mask reproduces for every position
at once.

On a CPU budget the work that does not depend on the head is done once: the base model's final hidden states are
computed in one pass and kept in the output folder (`hidden/chunk-*.safetensors`, or in a `--hidden-cache` that
runs on the same data share), sequences are batched by length, and the loss against the large frozen lm_head is
computed in row chunks together with its gradient, so that the logits are neither stored nor recomputed. Runs are
resumable: rerunning the same command continues from the latest checkpoint and ends with the same head as an
uninterrupted run.

An output folder holds:
    hidden/                 the base model's final hidden states, one safetensors file per chunk of rows
    checkpoints/step-N/     the latest checkpoint: head weights, optimizer, scheduler, RNG, data position
    train_log.jsonl         training loss every --log-every steps, validation loss and accuracy per eval
    head/                   the trained head (`FastMTPForCausalLM.from_pretrained(output / "head")`), with a copy of
                            the summary, so that a run continuing from it records both
    training_summary.json   data, steps, time, throughput, final validation accuracy per step, command line
    training.png            loss and per-step validation accuracy over the steps
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shlex
import shutil
import sys
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import (
    DynamicCache,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from ..decoding.configuration_fastmtp import check_num_draft_tokens
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..decoding.transformers_compat import attn_implementation, initialize_weights
from ..prompts import encode_chat
from ..run_settings import changed_settings
from .distill import DistillError, iter_distilled, read_manifest, tokenizer_fingerprint

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
# Rows of [rows, vocab] logits computed at once by the loss: bounds its memory (512 x 49152 fp32 logits = 100 MB).
CE_CHUNK_ROWS = 512
# Padded tokens per base-model forward when precomputing hidden states.
PRECOMPUTE_BATCH_TOKENS = 8192
# Rows per hidden-state file: an interrupted precompute loses at most one chunk's work.
ROWS_PER_CHUNK = 128
# Batches drawn per length-sorting window: little padding, yet a different mix of rows every epoch.
SORT_WINDOW_BATCHES = 50
LABELS = ("data", "base")
HIDDEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "training_summary.json"
PLOT_NAME = "training.png"
CHECKPOINTS_DIR = "checkpoints"


class TrainError(ValueError):
    """A problem with the options, the data or the output folder, explained for the user."""


# ---------------------------------------------------------------------------------------------- the objective


def loss_weights(num_steps: int, beta: float = 0.6, weights: Sequence[float] | None = None) -> list[float]:
    """
    The per-step weights alpha_1..alpha_K, normalised to sum to 1: `beta^(k-1) / sum_j beta^(j-1)` (0.51, 0.31, 0.18
    for K=3, beta=0.6), or the explicit `weights` (e.g. `[1, 0, 0]`: the paper's step-1-only "vanilla MTP" ablation).
    """
    check_num_draft_tokens(num_steps)
    if weights is None:
        if not beta > 0:
            raise TrainError(f"beta must be > 0, got {beta}.")
        weights = [beta**k for k in range(num_steps)]
    elif len(weights) != num_steps:
        raise TrainError(f"{len(weights)} loss weights given for {num_steps} draft steps: give one per step.")
    if any(w < 0 or not math.isfinite(w) for w in weights) or sum(weights) <= 0:
        raise TrainError(f"Loss weights must be finite, >= 0 and not all 0, got {list(weights)}.")
    return [w / sum(weights) for w in weights]


def step_labels(labels: torch.LongTensor, step: int) -> torch.LongTensor:
    """
    Labels of recursive step `step` (1-based): the same as step 1's, except at positions p < step - 1, where the
    chain of hidden states g_1 (at p-step+1) .. g_{step-1} (at p-1) that this step reads would start before position 0.
    """
    labels = labels.clone()
    labels[:, : step - 1] = IGNORE_INDEX
    return labels


def recursive_attention_mask(
    pair_mask: torch.BoolTensor, step: int, sliding_window: int | None = None
) -> torch.BoolTensor:
    """
    Which keys each query of recursive step `step` may attend to (True), shape [batch, 1, T, step * T].

    The keys are the head cache's entries of steps 1..step, T positions each. Query (step k, position p) is the k-th
    draft of the cycle whose step 1 ran at position p-k+1; when drafting it, the head's cache holds step-1 entries for
    the verified positions q <= p-(k-1) and this cycle's speculative entries of steps j=2..k, at positions p-(k-j).
    Keys of padding are hidden; every query sees at least its own key, so that queries without a valid chain
    (p < k-1) or padding queries, which the loss ignores, get no fully masked (NaN) row.
    """
    num_pairs = pair_mask.shape[1]
    device = pair_mask.device
    query = torch.arange(num_pairs, device=device)[:, None]
    key = torch.arange(num_pairs, device=device)[None, :]
    blocks = [key <= query - (step - 1)]
    blocks += [key == query - (step - j) for j in range(2, step + 1)]
    allowed = torch.cat(blocks, dim=1)
    if sliding_window is not None:
        allowed &= query - key.repeat(1, step) < sliding_window
    allowed = allowed[None] & pair_mask.repeat(1, step)[:, None, :]
    own_key = torch.zeros(num_pairs, step * num_pairs, dtype=torch.bool, device=device)
    own_key[:, (step - 1) * num_pairs :] = torch.eye(num_pairs, dtype=torch.bool, device=device)
    return (allowed | own_key)[:, None]


def head_sliding_window(model: FastMTPForCausalLM) -> int | None:
    """The head's attention window: Mistral-style bases (a window and no `layer_types`) keep theirs in the head."""
    if getattr(model.head_config, "layer_types", None) is not None:
        return None
    return getattr(model.head_config, "sliding_window", None)


def recursive_head_outputs(
    model: FastMTPForCausalLM,
    hidden_states: torch.Tensor,
    input_ids: torch.LongTensor,
    pair_mask: torch.BoolTensor,
    num_steps: int,
) -> list[torch.Tensor]:
    """
    The head's outputs g_1..g_K at every position p of a batch of pairs (h_p, t_{p+1}), as drafting computes them.

    Step 1 reads the base's hidden state h_p; step k > 1 reads g_{k-1} at p-1. The tokens are the same at every step:
    with teacher forcing, the draft step k-1 fed at position p is the true t_{p+1}. All steps share one cache, so step
    k attends over the keys of steps 1..k through `recursive_attention_mask`; the cache is created without a config,
    so that it keeps every key whatever the head's attention window (the mask applies the window).
    """
    batch_size, num_pairs = input_ids.shape
    position_ids = torch.arange(num_pairs, device=input_ids.device).expand(batch_size, num_pairs)
    window = head_sliding_window(model)
    cache = DynamicCache()
    outputs, hidden = [], hidden_states
    for step in range(1, num_steps + 1):
        mask = attention_mask_for(model, recursive_attention_mask(pair_mask, step, window))
        output = model.mtp_forward(hidden, input_ids, position_ids, past_key_values=cache, attention_mask=mask)
        outputs.append(output)
        hidden = F.pad(output[:, :-1], (0, 0, 1, 0))  # g_k at p-1 -> position p; position 0 has no chain
    return outputs


def attention_mask_for(model: FastMTPForCausalLM, allowed: torch.BoolTensor) -> torch.Tensor:
    """The boolean mask in the form the head's attention takes a custom 4D mask: as is (SDPA) or additive (eager)."""
    implementation = attn_implementation(model.head_config)
    if implementation == "sdpa":
        return allowed
    if implementation == "eager":
        return torch.zeros(allowed.shape, dtype=model.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(model.dtype).min
        )
    raise TrainError(
        f"Training needs 'sdpa' or 'eager' attention (a custom attention mask), the model uses {implementation!r}: "
        "load the base with attn_implementation='sdpa'."
    )


def response_cross_entropy(
    model: FastMTPForCausalLM,
    head_outputs: torch.Tensor,
    labels: torch.LongTensor,
    loss_vocab: torch.LongTensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Summed cross-entropy of the frozen lm_head's logits of `head_outputs` [N, H] for `labels` [N]; top-1 hits. With
    `loss_vocab` (sorted token ids), over those rows of the lm_head only, and `labels` must be indices into it.
    """
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if loss_vocab is not None:
        weight = weight[loss_vocab]
        bias = None if bias is None else bias[loss_vocab]
    softcap = getattr(model.config.text_config, "final_logit_softcapping", None)
    with_grad = torch.is_grad_enabled() and head_outputs.requires_grad
    return LinearCrossEntropy.apply(head_outputs.to(weight.device), weight, bias, labels, softcap, with_grad)


class LinearCrossEntropy(torch.autograd.Function):
    """
    Summed cross-entropy and top-1 hits of `hidden @ weight.T + bias` (optionally soft-capped), with `weight` frozen.

    The [N, vocab] logits (49152 columns for SmolLM2) are the bulk of the training cost and memory. They are made in
    row chunks and the gradient with respect to `hidden` is computed right away, from each chunk's softmax, so no
    logits are kept for the backward pass and none are recomputed: one lm_head matmul forward and one (to H columns)
    for the gradient, against three for autograd through checkpointed chunks.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, with_grad):
        """`with_grad`: whether to compute the gradient for `hidden` (`ctx.needs_input_grad` ignores `no_grad`)."""
        if with_grad and weight.requires_grad:
            raise ValueError("LinearCrossEntropy needs a frozen lm_head: it computes no gradient for it.")
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad = torch.empty_like(hidden) if with_grad else None
        for start in range(0, labels.numel(), CE_CHUNK_ROWS):
            rows = slice(start, start + CE_CHUNK_ROWS)
            logits = F.linear(hidden[rows], weight, bias).float()
            if softcap:
                capped = torch.tanh(logits / softcap)
                logits = capped * softcap
            log_norm = logits.logsumexp(dim=-1)
            targets = labels[rows, None]
            loss += (log_norm - logits.gather(1, targets).squeeze(1)).sum()
            hits += (logits.argmax(dim=-1) == labels[rows]).sum()
            if grad is not None:
                # d(CE)/d(logits) = softmax - one_hot, through tanh's derivative when soft-capped.
                grad_logits = logits.sub_(log_norm[:, None]).exp_()
                grad_logits.scatter_add_(1, targets, grad_logits.new_full(targets.shape, -1.0))
                if softcap:
                    grad_logits *= 1 - capped.square()
                grad[rows] = grad_logits.to(weight.dtype) @ weight
        ctx.mark_non_differentiable(hits)
        ctx.save_for_backward(grad)
        return loss, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_hits):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None


def feature_loss(
    output: torch.Tensor, hidden_states: torch.Tensor, selected: torch.BoolTensor, pair_mask: torch.BoolTensor
) -> torch.Tensor:
    """
    EAGLE's feature regression: smooth L1 between the head's output at pair p, which the lm_head reads to predict
    t_{p+2}, and the base's own hidden state h_{p+1} there (cached, free). A dense signal beside the cross-entropy
    that needs no lm_head; the last pair of a sequence has no h_{p+1} and is left out.
    """
    has_target = selected[:, :-1] & pair_mask[:, 1:]
    if not has_target.any():
        return output.new_zeros(())
    predicted = output[:, :-1][has_target].float()
    target = hidden_states[:, 1:][has_target].to(predicted.device, torch.float32)
    return F.smooth_l1_loss(predicted, target)


@torch.no_grad()
def base_greedy_labels(
    model: FastMTPForCausalLM, hidden_states: torch.Tensor, labels: torch.LongTensor, pair_mask: torch.BoolTensor
) -> torch.LongTensor:
    """
    The base model's own greedy choice for each label: at pair p, argmax lm_head(h_{p+1}) instead of the token
    t_{p+2} of the data. Greedy verification accepts a draft exactly when it is that choice, and sampled data differs
    from it at a share of positions (~16% of SmolLM2's answers at temperature 0.6). The last pair of a sequence has no
    cached h_{p+1} and keeps its data label.
    """
    lm_head = model.get_output_embeddings()
    flat = hidden_states.reshape(-1, hidden_states.shape[-1]).to(lm_head.weight.device, lm_head.weight.dtype)
    # The argmax is the same with or without a soft-cap (tanh is increasing).
    choices = torch.cat(
        [lm_head(flat[rows]).argmax(dim=-1) for rows in torch.split(torch.arange(len(flat)), CE_CHUNK_ROWS)]
    )
    choices = choices.view(labels.shape).to(labels.device)
    replace = (labels[:, :-1] != IGNORE_INDEX) & pair_mask[:, 1:]
    greedy = labels.clone()
    greedy[:, :-1] = torch.where(replace, choices[:, 1:], labels[:, :-1])
    return greedy


class FastMTPTrainingModule(nn.Module):
    """
    Owns the FastMTP model and computes a batch's loss: the one module `accelerate` wraps for (distributed) training.

    `forward` returns the weighted loss `sum_k alpha_k CE_k` (CE_k: mean over the step's response labels) and, per
    step, `[summed CE, top-1 hits, labels]` (detached) for logging and validation. Steps after the last one with a
    non-zero weight are skipped in training; `all_steps=True` (validation) computes every step.

    Options (`fastmtp train` flags): `base_labels` replaces the data's labels with the base's greedy choices
    (`--labels base`), `feature_weight` adds EAGLE's feature regression, and `loss_vocab` restricts the cross-entropy
    (and the top-1 hits) to those tokens (`--loss-vocab-size`).
    """

    def __init__(
        self,
        model: FastMTPForCausalLM,
        weights: Sequence[float],
        base_labels: bool = False,
        feature_weight: float = 0.0,
        loss_vocab: torch.LongTensor | None = None,
    ):
        super().__init__()
        self.model = model
        self.weights = list(weights)
        self.base_labels = base_labels
        self.feature_weight = feature_weight
        self.loss_vocab = None
        if loss_vocab is not None:
            # Token id -> its index in the loss vocabulary, or IGNORE_INDEX: labels outside it have no logit.
            self.loss_vocab = torch.sort(loss_vocab).values
            self.vocab_index = torch.full((model.vocab_size,), IGNORE_INDEX, dtype=torch.long)
            self.vocab_index[self.loss_vocab] = torch.arange(len(self.loss_vocab))

    def forward(
        self,
        hidden_states: torch.Tensor,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor,
        pair_mask: torch.BoolTensor,
        all_steps: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base_labels:
            labels = base_greedy_labels(self.model, hidden_states, labels, pair_mask)
        loss_vocab = None
        if self.loss_vocab is not None:
            loss_vocab = self.loss_vocab.to(labels.device)
            inside = labels != IGNORE_INDEX
            labels = labels.masked_scatter(inside, self.vocab_index.to(labels.device)[labels[inside]])
        trained_steps = max(k + 1 for k, weight in enumerate(self.weights) if weight > 0)
        num_steps = len(self.weights) if all_steps else trained_steps
        outputs = recursive_head_outputs(
            self.model, hidden_states.to(self.model.dtype), input_ids, pair_mask, num_steps
        )
        loss = hidden_states.new_zeros((), dtype=torch.float32)
        stats = torch.zeros(len(self.weights), 3, dtype=torch.float32, device=input_ids.device)
        for step, (output, weight) in enumerate(zip(outputs, self.weights), start=1):
            if weight == 0 and not all_steps:
                continue
            labels_k = step_labels(labels, step)
            selected = labels_k != IGNORE_INDEX
            count = int(selected.sum())
            if count == 0:
                continue
            summed, hits = response_cross_entropy(self.model, output[selected], labels_k[selected], loss_vocab)
            loss = loss + weight * summed / count
            if self.feature_weight:
                loss = loss + weight * self.feature_weight * feature_loss(output, hidden_states, selected, pair_mask)
            stats[step - 1] = torch.stack([summed.detach(), hits.float(), summed.new_tensor(float(count))])
        return loss, stats


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Example:
    """One training sequence: prompt then response token ids, and where the response starts."""

    id: str
    input_ids: tuple[int, ...]
    prompt_length: int

    @property
    def num_pairs(self) -> int:
        """Head inputs (h_p, t_{p+1}) that have a label t_{p+2}: positions 0 .. len-3."""
        return len(self.input_ids) - 2

    @property
    def num_labels(self) -> int:
        """Response tokens the head predicts (at step 1): those at index >= 2 (a pair needs h_p, t_{p+1} before)."""
        return len(self.input_ids) - max(self.prompt_length, 2)


@dataclass
class DataReport:
    """What loading kept and dropped, for the warnings and the training summary."""

    rows_read: int = 0
    truncated: int = 0
    dropped_no_response: int = 0
    dropped_too_long: int = 0
    sources: list[str] = field(default_factory=list)  # the prompts' datasets, for the model card


def load_distilled_examples(
    folder: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_rows: int | None = None,
    max_seq_len: int,
) -> tuple[list[Example], DataReport]:
    """Rows of a `fastmtp distill` folder, refused if they were made with another tokenizer."""
    try:
        manifest = read_manifest(folder)
        check_tokenizer(manifest, tokenizer, folder)
        rows, sources = [], set()
        for row in iter_distilled(folder):
            if max_rows is not None and len(rows) == max_rows:
                break
            rows.append((str(row["id"]), row["prompt_ids"], row["response_ids"]))
            sources.add(str(row["source"]))
    except (FileNotFoundError, DistillError) as error:
        raise TrainError(str(error)) from None
    vocab_size = len(tokenizer)
    for row_id, prompt_ids, response_ids in rows:
        for name, ids in (("prompt_ids", prompt_ids), ("response_ids", response_ids)):
            if not isinstance(ids, list) or not all(isinstance(t, int) and 0 <= t < vocab_size for t in ids):
                raise TrainError(
                    f"{folder}: row {row_id!r} has malformed {name} (not a list of token ids < {vocab_size})."
                )
    return build_examples(rows, max_seq_len, sources)


def check_tokenizer(manifest: dict, tokenizer: PreTrainedTokenizerBase, folder: str | os.PathLike) -> None:
    """Token ids are only meaningful with the tokenizer that made them."""
    made_with = manifest.get("tokenizer")
    if not isinstance(made_with, dict) or "fingerprint" not in made_with or "vocab_size" not in made_with:
        raise TrainError(f"{folder}/manifest.json does not record the tokenizer its data was made with.")
    ours = {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}
    if made_with["fingerprint"] != ours["fingerprint"] or made_with["vocab_size"] != ours["vocab_size"]:
        raise TrainError(
            f"{folder} was made with another tokenizer (vocab size {made_with['vocab_size']}, fingerprint "
            f"{made_with['fingerprint']}) than this base model's (vocab size {ours['vocab_size']}, fingerprint "
            f"{ours['fingerprint']}, model {manifest.get('model')!r} made the data): its token ids would be "
            "meaningless. Train with the base the data was distilled from, or distill data with this one."
        )


def load_reference_examples(
    path: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase,
    *,
    max_rows: int | None = None,
    max_seq_len: int,
) -> tuple[list[Example], DataReport]:
    """
    The paper's "fixed data" ablation: a prompts JSONL whose rows hold a `prompt` and a human `reference` answer; the
    response is the reference's tokens plus EOS, after the prompt in the base's chat template.
    """
    path = Path(path)
    if not path.is_file():
        raise TrainError(f"Reference data file {path} not found.")
    if tokenizer.eos_token_id is None:
        raise TrainError("The tokenizer has no EOS token to end the reference answers with.")
    rows, sources = [], set()
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if max_rows is not None and len(rows) == max_rows:
                break
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise TrainError(f"{path}, line {number}: not valid JSON ({error.msg}).") from None
            if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in ("prompt", "reference")):
                raise TrainError(f"{path}, line {number}: needs the string fields prompt and reference.")
            if not row["prompt"].strip():
                raise TrainError(f"{path}, line {number}: the prompt is empty.")
            prompt_ids = encode_chat(tokenizer, row["prompt"])["input_ids"][0].tolist()
            response_ids = tokenizer(row["reference"], add_special_tokens=False)["input_ids"]
            response_ids = response_ids + [tokenizer.eos_token_id] if row["reference"].strip() else []
            rows.append((str(row.get("id", f"line-{number}")), prompt_ids, response_ids))
            sources.add(str(row.get("source", path.name)))
    return build_examples(rows, max_seq_len, sources)


def build_examples(
    rows: Sequence[tuple[str, list[int], list[int]]], max_seq_len: int, sources: Iterable[str] = ()
) -> tuple[list[Example], DataReport]:
    """Examples of `(id, prompt_ids, response_ids)` rows, truncated to `max_seq_len`; rows with nothing to learn go."""
    if not rows:
        raise TrainError("The training data has no rows.")
    report, examples = DataReport(rows_read=len(rows), sources=sorted(sources)), []
    for row_id, prompt_ids, response_ids in rows:
        if not response_ids:
            report.dropped_no_response += 1
            continue
        ids = (*prompt_ids, *response_ids)
        if len(ids) > max_seq_len:
            report.truncated += 1
            ids = ids[:max_seq_len]
        example = Example(row_id, ids, len(prompt_ids))
        if example.num_labels <= 0:
            report.dropped_too_long += 1
            continue
        examples.append(example)
    if report.dropped_no_response == len(rows):
        raise TrainError(f"None of the {len(rows)} rows has a response: there is nothing to train the head on.")
    if not examples:
        raise TrainError(
            f"All {len(rows)} rows are dropped: their prompts leave no response token within --max-seq-len "
            f"{max_seq_len} ({report.dropped_no_response} without a response). Raise --max-seq-len or shorten them."
        )
    if report.truncated:
        logger.warning("Truncated %d rows longer than --max-seq-len %d tokens.", report.truncated, max_seq_len)
    if report.dropped_too_long or report.dropped_no_response:
        logger.warning(
            "Dropped %d rows whose prompt fills --max-seq-len %d and %d rows without a response.",
            report.dropped_too_long,
            max_seq_len,
            report.dropped_no_response,
        )
    return examples, report


def is_validation(row_id: str, fraction: float) -> bool:
    """A row's split, fixed by a hash of its id: the same rows are held out whatever the row order or --max-rows."""
    digest = hashlib.sha256(row_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


# ---------------------------------------------------------------------------------------------- hidden-state cache


class HiddenStateStore:
    """The base model's final hidden states h_0..h_{len-3} of each example, read from the precomputed chunk files."""

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
) -> HiddenStateStore:
    """
    Computes the base model's final hidden states once for all `examples` and stores them in `folder`, chunk by chunk.

    The base is frozen, so these are what it would compute at every epoch, exactly up to the storage `dtype`. A chunk
    file records a digest of the base model and of its rows: a rerun keeps the chunks that still match (resuming an
    interrupted precompute) and recomputes the others. Processes share the chunks round-robin; the caller waits for
    all of them before reading (`accelerator.wait_for_everyone()`).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    base_digest = base_fingerprint(base)
    chunks = [examples[start : start + rows_per_chunk] for start in range(0, len(examples), rows_per_chunk)]
    paths = [folder / f"chunk-{index:05d}.safetensors" for index in range(len(chunks))]
    todo = []
    for index in range(process_index, len(chunks), num_processes):
        digest = chunk_digest(base_digest, dtype, chunks[index])
        if stored_digest(paths[index]) != digest:
            todo.append((index, digest))
    total_tokens = sum(example.num_pairs for index, _ in todo for example in chunks[index])
    with tqdm(total=total_tokens, unit="tok", unit_scale=True, desc="base hidden states", disable=not progress) as bar:
        for index, digest in todo:
            tensors = {}
            for row, hidden in base_hidden_states(base, chunks[index]):
                tensors[str(row)] = hidden.to(dtype).contiguous()
                bar.update(hidden.shape[0])
            staging = paths[index].with_suffix(".tmp")
            save_file(tensors, staging, metadata={"digest": digest})
            os.replace(staging, paths[index])
    return HiddenStateStore(paths, rows_per_chunk)


@torch.inference_mode()
def base_hidden_states(base: PreTrainedModel, examples: Sequence[Example]) -> Iterator[tuple[int, torch.Tensor]]:
    """`(row, hidden states [num_pairs, H])` for each example, from length-sorted, right-padded batches."""
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
        hidden = decoder(
            input_ids=input_ids.to(base.device), attention_mask=attention_mask.to(base.device), use_cache=False
        ).last_hidden_state
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


def chunk_digest(base_digest: str, dtype: torch.dtype, examples: Sequence[Example]) -> str:
    digest = hashlib.sha256(f"{base_digest}/{dtype}".encode())
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
    response and on padding), `pair_mask` (True on real pairs).
    """
    width = max(example.num_pairs for example, _ in items)
    hidden_size = items[0][1].shape[-1]
    hidden_states = torch.zeros(len(items), width, hidden_size, dtype=items[0][1].dtype)
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
    return {"hidden_states": hidden_states, "input_ids": input_ids, "labels": labels, "pair_mask": pair_mask}


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


# ---------------------------------------------------------------------------------------------- training


@dataclass
class TrainConfig:
    """Options of `train`; the CLI's flags, with the same names and defaults."""

    output: str
    data: str | None = None
    reference_data: str | None = None
    num_draft_tokens: int = 3
    beta: float = 0.6
    loss_weights: list[float] | None = None
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_ratio: float = 0.05
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    max_rows: int | None = None
    max_seq_len: int | None = None
    val_fraction: float = 0.02
    seed: int = 0
    init: str = "random"
    labels: str = "data"
    feature_weight: float = 0.0
    loss_vocab_size: int | None = None
    lora_rank: int | None = None
    mixed_precision: str = "no"
    hidden_dtype: str = "float16"
    hidden_cache: str | None = None
    eval_every: int | None = None
    save_every: int = 100
    log_every: int = 10
    progress: bool = True

    def check(self) -> None:
        """Raises `TrainError` for an option out of range; cheap, so the CLI runs it before loading a model."""
        if (self.data is None) == (self.reference_data is None):
            raise TrainError("Give exactly one of --data (a `fastmtp distill` folder) and --reference-data (a JSONL).")
        if self.data is not None and not Path(self.data).is_dir():
            raise TrainError(f"--data folder {self.data} not found: run `fastmtp distill --output {self.data}` first.")
        if self.reference_data is not None and not Path(self.reference_data).is_file():
            raise TrainError(f"--reference-data file {self.reference_data} not found.")
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_steps": self.max_steps,
            "max_rows": self.max_rows,
            "lora_rank": self.lora_rank,
            "loss_vocab_size": self.loss_vocab_size,
            "eval_every": self.eval_every,
            "save_every": self.save_every,
            "log_every": self.log_every,
        }
        for name, value in positive.items():
            if value is not None and value < 1:
                raise TrainError(f"{name} must be at least 1, got {value}.")
        if self.max_seq_len is not None and self.max_seq_len < 3:
            raise TrainError(
                f"max_seq_len must be at least 3 (a prompt token, an input token, a label), got {self.max_seq_len}."
            )
        if not self.epochs > 0:
            raise TrainError(f"epochs must be > 0, got {self.epochs}.")
        if not self.feature_weight >= 0:
            raise TrainError(f"feature_weight must be >= 0, got {self.feature_weight}.")
        if not self.lr > 0 or self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise TrainError("lr and max_grad_norm must be > 0 and weight_decay >= 0.")
        if not 0 <= self.warmup_ratio < 1 or not 0 <= self.val_fraction < 1:
            raise TrainError("warmup_ratio and val_fraction must be in [0, 1).")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise TrainError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}.")
        if self.labels not in LABELS:
            raise TrainError(f"labels must be one of {', '.join(LABELS)}, got {self.labels!r}.")
        if self.hidden_dtype not in HIDDEN_DTYPES:
            raise TrainError(f"hidden_dtype must be one of {', '.join(HIDDEN_DTYPES)}, got {self.hidden_dtype!r}.")
        if self.init not in ("last-layer", "random") and not (Path(self.init) / "config.json").is_file():
            raise TrainError(f"--init must be last-layer, random or a head folder; {self.init} has no config.json.")
        try:
            check_num_draft_tokens(self.num_draft_tokens)
        except ValueError as error:
            raise TrainError(str(error)) from None
        loss_weights(self.num_draft_tokens, self.beta, self.loss_weights)

    def identity(self) -> dict:
        """
        The options that decide the trained head: a checkpoint made with others cannot be resumed with these. Which
        data (path, --max-rows) is checked on the examples themselves (`TrainingData.fingerprint`).
        """
        ignored = (
            "output",
            "data",
            "reference_data",
            "max_rows",
            "hidden_cache",
            "eval_every",
            "save_every",
            "log_every",
            "progress",
        )
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in ignored}


@dataclass
class TrainState:
    """Progress saved with each checkpoint: optimizer steps done and where in which epoch the data stands."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0
    tokens: int = 0


@dataclass
class TrainResult:
    head_dir: Path
    summary: dict = field(default_factory=dict)


def train(
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    *,
    base_model_name_or_path: str | None = None,
) -> TrainResult:
    """
    Trains a FastMTP head for `base` (frozen) on `config.data` or `config.reference_data` and saves it in
    `config.output/head`. Rerunning with the same config resumes from the latest checkpoint in `config.output`.
    Runs as is under `accelerate launch` on several processes (data-parallel).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.check()
    Path(config.output).mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    data = prepare_data(base, tokenizer, config, accelerator)
    model = build_model(base, config, base_model_name_or_path)
    lora = add_lora(model, config.lora_rank) if config.lora_rank else None
    run = TrainingRun(accelerator, model, data, config)
    run.train()

    head_dir = Path(config.output) / "head"
    summary = {}
    if accelerator.is_main_process:
        if lora is not None:
            lora.merge_and_unload()
        summary = write_summary(config, data, run.state, run.steps_per_epoch, accelerator)
        save_head(model, head_dir, data.report, summary)
        plot_training_log(Path(config.output) / LOG_NAME, Path(config.output) / PLOT_NAME)
    accelerator.wait_for_everyone()
    return TrainResult(head_dir, summary)


@dataclass
class TrainingData:
    """The examples, their split, and their cached hidden states."""

    examples: list[Example]
    report: DataReport
    train_indices: list[int]
    val_indices: list[int]
    store: HiddenStateStore

    def fingerprint(self) -> dict:
        """What a checkpoint must have been trained on to be resumed: `fastmtp distill` may have added rows since."""
        digest = hashlib.sha256()
        for example in self.examples:
            digest.update(f"{example.id}/{len(example.input_ids)}/{example.prompt_length};".encode())
        return {"rows": len(self.examples), "digest": digest.hexdigest()[:16]}


def prepare_data(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig, accelerator
) -> TrainingData:
    """Loads and splits the examples, and precomputes the base model's hidden states for all of them."""
    examples, report = load_examples(base, tokenizer, config)
    val_indices = [i for i, example in enumerate(examples) if is_validation(example.id, config.val_fraction)]
    train_indices = sorted(set(range(len(examples))) - set(val_indices))
    if not train_indices:
        raise TrainError(f"All {len(examples)} rows fell in the validation split: lower --val-fraction.")
    if config.val_fraction > 0 and not val_indices:
        logger.warning("No row fell in the validation split (%d rows): validation is skipped.", len(examples))
    base.requires_grad_(False).eval().to(accelerator.device)
    store = precompute_hidden_states(
        base,
        examples,
        config.hidden_cache or Path(config.output) / "hidden",
        dtype=HIDDEN_DTYPES[config.hidden_dtype],
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        progress=config.progress and accelerator.is_local_main_process,
    )
    accelerator.wait_for_everyone()
    return TrainingData(examples, report, train_indices, val_indices, store)


class TrainingRun:
    """The prepared module, optimizer, data and schedule of one run, resumed from its latest checkpoint if any."""

    def __init__(self, accelerator, model: FastMTPForCausalLM, data: TrainingData, config: TrainConfig):
        self.accelerator = accelerator
        self.model = model
        self.config = config
        self.weights = loss_weights(config.num_draft_tokens, config.beta, config.loss_weights)
        self.sampler = LengthGroupedBatches(
            [data.examples[i].num_pairs for i in data.train_indices], config.batch_size, config.seed
        )
        loader = DataLoader(
            PairDataset(data.examples, data.train_indices, data.store),
            batch_sampler=self.sampler,
            collate_fn=collate_pairs,
        )
        loss_vocab = None
        if config.loss_vocab_size:
            loss_vocab = frequent_response_tokens(
                [data.examples[i] for i in data.train_indices], config.loss_vocab_size
            )
        optimizer = torch.optim.AdamW(parameter_groups(model.head, config.weight_decay), lr=config.lr)
        self.module, self.optimizer, self.loader = accelerator.prepare(
            FastMTPTrainingModule(
                model,
                self.weights,
                base_labels=config.labels == "base",
                feature_weight=config.feature_weight,
                loss_vocab=loss_vocab,
            ),
            optimizer,
            loader,
        )
        self.steps_per_epoch = math.ceil(len(self.loader) / config.grad_accum)
        self.total_steps = config.max_steps or math.ceil(config.epochs * self.steps_per_epoch)
        # accelerate steps a prepared scheduler once per process: count its steps in process-steps.
        warmup_steps = math.ceil(config.warmup_ratio * self.total_steps)
        self.scheduler = accelerator.prepare(
            get_cosine_schedule_with_warmup(
                self.optimizer, warmup_steps * accelerator.num_processes, self.total_steps * accelerator.num_processes
            )
        )
        val_batches = validation_batches(data.examples, data.val_indices, data.store, config.batch_size)
        self.val_batches = val_batches[accelerator.process_index :: accelerator.num_processes]
        self.validates = bool(data.val_indices)
        self.eval_every = config.eval_every or max(1, self.total_steps // 10)
        self.checkpoints = Path(config.output) / CHECKPOINTS_DIR
        self.data_fingerprint = data.fingerprint()
        self.state = resume(
            self.checkpoints, model.head, self.optimizer, self.scheduler, config, self.data_fingerprint
        )
        self.log = TrainLog(Path(config.output) / LOG_NAME, enabled=accelerator.is_main_process)
        self.log.keep_until(self.state.step)
        # [summed CE, hits, labels] per step, and seconds, since the last log record
        self.window = torch.zeros(len(self.weights), 3)
        self.window_seconds = 0.0

    def train(self) -> None:
        if self.state.step == 0 and self.validates:
            self.log.write({"step": 0, **self.validate()})
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.state.step,
            unit="step",
            desc="train",
            disable=not (self.config.progress and self.accelerator.is_local_main_process),
        )
        while self.state.step < self.total_steps:
            self.run_epoch()
        self.bar.close()

    def run_epoch(self) -> None:
        """The rest of the current epoch (all of it unless resuming), or until the last step."""
        state = self.state
        self.sampler.epoch = state.epoch
        loader = self.loader
        if state.batch_in_epoch:
            loader = self.accelerator.skip_first_batches(loader, state.batch_in_epoch)
        self.module.train()
        self.model.model.eval()
        tick = time.perf_counter()
        for batch in loader:
            with self.accelerator.accumulate(self.module):
                loss, stats = self.module(**batch)
                self.accelerator.backward(loss)
                if self.accelerator.sync_gradients:
                    self.accelerator.clip_grad_norm_(self.module.parameters(), self.config.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad()
            stats = self.accelerator.reduce(stats, "sum").cpu()
            seconds = time.perf_counter() - tick
            self.window += stats
            self.window_seconds += seconds
            state.seconds += seconds
            state.tokens += int(stats[0, 2])
            state.batch_in_epoch += 1
            if state.batch_in_epoch == len(self.loader):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
            if self.accelerator.sync_gradients:
                state.step += 1
                self.after_step()
                if state.step == self.total_steps:
                    return
            tick = time.perf_counter()

    def after_step(self) -> None:
        """Progress bar, log record, validation and checkpoint, each when due."""
        step, last = self.state.step, self.state.step == self.total_steps
        rate = float(self.window[0, 2]) / self.window_seconds
        self.bar.update(1)
        self.bar.set_postfix_str(f"loss {weighted_loss(self.window, self.weights):.3f}, {rate:.0f} tok/s")
        if step % self.config.log_every == 0 or last:
            lr = self.scheduler.get_last_lr()[0]
            self.log.write(training_record(self.state, self.window, self.weights, lr, rate))
            self.window.zero_()
            self.window_seconds = 0.0
        if self.validates and (step % self.eval_every == 0 or last):
            record = {"step": step, **self.validate()}
            self.log.write(record)
            if not self.bar.disable:
                self.bar.write(format_validation(record))
            self.module.train()
            self.model.model.eval()
        if step % self.config.save_every == 0 or last:
            save_checkpoint(self, self.checkpoints / f"step-{step:07d}")

    def validate(self) -> dict:
        """Validation loss and top-1 accuracy per step (teacher forced: a proxy of each draft's acceptance)."""
        accelerator = self.accelerator
        training_module = accelerator.unwrap_model(self.module)
        training_module.eval()
        totals = torch.zeros(len(self.weights), 3, device=accelerator.device)
        with torch.no_grad(), accelerator.autocast():
            for batch in self.val_batches:
                batch = {k: v.to(accelerator.device) for k, v in collate_pairs(batch).items()}
                totals += training_module(**batch, all_steps=True)[1]
        totals = accelerator.reduce(totals, "sum").cpu()
        counts = totals[:, 2].clamp(min=1)
        return {
            "val_loss": weighted_loss(totals, self.weights),
            "val_loss_per_step": (totals[:, 0] / counts).tolist(),
            "val_accuracy": (totals[:, 1] / counts).tolist(),
        }


def load_examples(
    base: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, config: TrainConfig
) -> tuple[list[Example], DataReport]:
    context = getattr(base.config, "max_position_embeddings", None)
    max_seq_len = config.max_seq_len or context or 2048
    if context is not None and max_seq_len > context:
        raise TrainError(f"--max-seq-len {max_seq_len} is longer than the base model's context ({context} tokens).")
    if config.data is not None:
        return load_distilled_examples(config.data, tokenizer, max_rows=config.max_rows, max_seq_len=max_seq_len)
    return load_reference_examples(config.reference_data, tokenizer, max_rows=config.max_rows, max_seq_len=max_seq_len)


def build_model(base: PreTrainedModel, config: TrainConfig, base_model_name_or_path: str | None) -> FastMTPForCausalLM:
    """The model with its starting head: `random`, the base's last layer (`last-layer`), or a saved head folder."""
    if config.init not in ("last-layer", "random"):
        model = FastMTPForCausalLM.from_pretrained(config.init, base_model=base)
        model.config.num_draft_tokens = config.num_draft_tokens
    else:
        model = FastMTPForCausalLM.from_base(
            base, num_draft_tokens=config.num_draft_tokens, base_model_name_or_path=base_model_name_or_path
        )
        if config.init == "random":
            initialize_weights(base, model.head)
    model.model.requires_grad_(False)
    return model


def add_lora(model: FastMTPForCausalLM, rank: int):
    """LoRA adapters on every Linear of the head (peft); only they train. Returns the `PeftModel`."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainError("--lora-rank needs peft: pip install 'hf_fastmtp[train]'.") from None
    targets = [name for name, module in model.head.named_modules() if isinstance(module, nn.Linear)]
    # Injected in place: model.head keeps working, with the adapters inside.
    return get_peft_model(
        model.head, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=targets)
    )


def parameter_groups(head: nn.Module, weight_decay: float) -> list[dict]:
    """Trainable head parameters; no weight decay on norms and biases."""
    trainable = [p for p in head.parameters() if p.requires_grad]
    return [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]


def frequent_response_tokens(examples: Sequence[Example], size: int) -> torch.LongTensor:
    """The `size` most frequent response tokens of `examples` (ties: lower id first), for `--loss-vocab-size`."""
    counts = Counter(token for example in examples for token in example.input_ids[example.prompt_length :])
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    return torch.tensor(ranked[:size], dtype=torch.long)


def validation_batches(
    examples: Sequence[Example], indices: Sequence[int], store: HiddenStateStore, batch_size: int
) -> list[list[tuple[Example, torch.Tensor]]]:
    ordered = sorted(indices, key=lambda i: examples[i].num_pairs)
    return [[(examples[i], store[i]) for i in ordered[s : s + batch_size]] for s in range(0, len(ordered), batch_size)]


def weighted_loss(stats: torch.Tensor, weights: Sequence[float]) -> float:
    counts = stats[:, 2].clamp(min=1)
    return float(sum(w * s for w, s in zip(weights, (stats[:, 0] / counts).tolist())))


def training_record(state: TrainState, stats: torch.Tensor, weights: Sequence[float], lr: float, rate: float) -> dict:
    counts = stats[:, 2].clamp(min=1)
    return {
        "step": state.step,
        "epoch": state.epoch,
        "loss": weighted_loss(stats, weights),
        "loss_per_step": (stats[:, 0] / counts).tolist(),
        "accuracy": (stats[:, 1] / counts).tolist(),
        "lr": lr,
        "tokens_per_second": rate,
    }


def format_validation(record: dict) -> str:
    accuracy = " ".join(f"{a:.3f}" for a in record["val_accuracy"])
    return f"step {record['step']}: val loss {record['val_loss']:.4f}, top-1 accuracy per step {accuracy}"


class TrainLog:
    """Appends JSON records to train_log.jsonl (main process only)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled

    def keep_until(self, step: int) -> None:
        """Drops what an interrupted run logged after the checkpoint it resumes from (all, when starting anew)."""
        if self.enabled and self.path.exists():
            lines = self.path.read_text(encoding="utf-8").splitlines()
            kept = [line for line in lines if line.strip() and step > 0 and json.loads(line)["step"] <= step]
            self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as file:
                file.write(json.dumps(record) + "\n")


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(run: TrainingRun, target: Path) -> None:
    """
    Writes `target` (checkpoints/step-N) through a staging folder renamed into place, so that a checkpoint is complete
    or absent, then deletes the older ones. Only at optimizer-step boundaries: no gradient accumulation is in flight.
    """
    if run.accelerator.is_main_process and not target.exists():
        staging = target.with_name(f".staging-{target.name}")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        head_state = {name: tensor.detach().cpu().contiguous() for name, tensor in run.model.head.state_dict().items()}
        save_file(head_state, staging / "head.safetensors")
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainer = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rng}
        torch.save(trainer, staging / "trainer.pt")
        saved = {"state": dataclasses.asdict(run.state), "config": run.config.identity(), "data": run.data_fingerprint}
        (staging / "state.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
        os.replace(staging, target)
        for older in target.parent.glob("step-*"):
            if older != target:
                shutil.rmtree(older)
    run.accelerator.wait_for_everyone()


def latest_checkpoint(folder: Path) -> Path | None:
    checkpoints = sorted(folder.glob("step-*")) if folder.is_dir() else []
    return checkpoints[-1] if checkpoints else None


def resume(
    folder: Path, head: nn.Module, optimizer, scheduler, config: TrainConfig, data_fingerprint: dict
) -> TrainState:
    """
    Loads the latest checkpoint, if any, into the head, optimizer, scheduler and RNGs; returns the progress. Refuses a
    checkpoint made with other settings or on other data: the run could not end as the interrupted one would have.
    """
    checkpoint_dir = latest_checkpoint(folder)
    if checkpoint_dir is None:
        return TrainState()
    saved = json.loads((checkpoint_dir / "state.json").read_text(encoding="utf-8"))
    start_over = f"Use another --output, or delete {checkpoint_dir.parent} to start over."
    changed = changed_settings(saved["config"], config.identity())
    if changed:
        details = "; ".join(changed)
        raise TrainError(
            f"{checkpoint_dir.parent.parent} holds a run with other settings ({details}): resume it with the same "
            f"settings. {start_over}"
        )
    if saved["data"] != data_fingerprint:
        raise TrainError(
            f"{checkpoint_dir.parent.parent} holds a run on other data ({saved['data']['rows']} rows there, "
            f"{data_fingerprint['rows']} now: has `fastmtp distill` added rows since?). If it trained on the first "
            f"rows, --max-rows {saved['data']['rows']} resumes it. {start_over}"
        )
    head.load_state_dict(load_file(checkpoint_dir / "head.safetensors"))
    trainer = torch.load(checkpoint_dir / "trainer.pt", weights_only=True)
    optimizer.load_state_dict(trainer["optimizer"])
    scheduler.load_state_dict(trainer["scheduler"])
    random.setstate(trainer["rng"]["python"])
    torch.set_rng_state(trainer["rng"]["torch"])
    if "cuda" in trainer["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(trainer["rng"]["cuda"])
    state = TrainState(**saved["state"])
    logger.warning("Resuming from %s (step %d).", checkpoint_dir, state.step)
    return state


def save_head(model: FastMTPForCausalLM, head_dir: Path, report: DataReport, summary: dict) -> None:
    """
    `save_pretrained` into a staging folder that replaces `head_dir`, so a crash never leaves half a head. The model
    card lists the prompts' datasets (and so gets the licence of Alpaca-derived data right) and how it was trained.
    """
    staging = head_dir.with_name(f".staging-{head_dir.name}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, model_card_extra={"datasets": report.sources, "training": summary})
    # Kept with the head, so that a run continuing from it (--init) can record the whole lineage.
    (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    shutil.rmtree(head_dir, ignore_errors=True)
    os.replace(staging, head_dir)


def write_summary(
    config: TrainConfig, data: TrainingData, state: TrainState, steps_per_epoch: int, accelerator
) -> dict:
    output = Path(config.output)
    records = [json.loads(line) for line in (output / LOG_NAME).read_text(encoding="utf-8").splitlines()]
    validations = [r for r in records if "val_accuracy" in r]
    summary = {
        "data": config.data or config.reference_data,
        "rows": {
            "read": data.report.rows_read,
            "train": len(data.train_indices),
            "validation": len(data.val_indices),
            "truncated": data.report.truncated,
            "dropped": data.report.dropped_no_response + data.report.dropped_too_long,
        },
        "response_tokens": {
            "train": sum(data.examples[i].num_labels for i in data.train_indices),
            "validation": sum(data.examples[i].num_labels for i in data.val_indices),
        },
        "steps": state.step,
        "epochs": state.step / steps_per_epoch,
        "seconds": state.seconds,
        "train_tokens_per_second": state.tokens / state.seconds if state.seconds else None,
        "loss_weights": loss_weights(config.num_draft_tokens, config.beta, config.loss_weights),
        "final_validation": validations[-1] if validations else None,
        "tau_estimate": tau_estimate(validations[-1]["val_accuracy"]) if validations else None,
        "hardware": hardware_name(accelerator.device, accelerator.num_processes),
        "command": command_line(),
        "config": dataclasses.asdict(config),
    }
    if config.data is not None:
        manifest = read_manifest(config.data)
        summary["distilled_by"] = {"model": manifest.get("model"), "sampling": manifest.get("sampling")}
    init_summary = Path(config.init) / SUMMARY_NAME
    if config.init not in ("random", "last-layer") and init_summary.is_file():
        # Continued from a head that `fastmtp train` made: its training comes first.
        summary["initialised_from"] = json.loads(init_summary.read_text(encoding="utf-8"))
    (output / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


def hardware_name(device: torch.device, num_processes: int = 1) -> str:
    """What trained the head, for the model card: the GPU's name, or the CPU and its thread count."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        threads = torch.get_num_threads()
        name = f"CPU, {threads} thread{'' if threads == 1 else 's'}"
    return name if num_processes == 1 else f"{num_processes} x {name}"


def command_line() -> str:
    """The command that is running, as a user would type it (`fastmtp`, also under `python -m hf_fastmtp.cli`)."""
    program = Path(sys.argv[0])
    is_fastmtp = program.name == "fastmtp" or program.parts[-3:] == ("hf_fastmtp", "cli", "__main__.py")
    return shlex.join(["fastmtp" if is_fastmtp else program.name, *sys.argv[1:]])


def tau_estimate(accuracies: Sequence[float]) -> float:
    """
    Mean tokens per verification, 1 + a1 + a1 a2 + ..., if the teacher-forced accuracy a_k of step k were the
    acceptance rate of draft k given that drafts 1..k-1 were accepted (it is, for greedy decoding on greedy data).
    """
    return 1 + sum(math.prod(accuracies[: k + 1]) for k in range(len(accuracies)))


def plot_training_log(log_path: Path, png_path: Path) -> None:
    """Training and validation loss, and validation top-1 accuracy per draft step, over the optimizer steps."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    records = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    figure = Figure(figsize=(11, 4), layout="constrained")
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    loss_axes.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    loss_axes.plot([r["step"] for r in val], [r["val_loss"] for r in val], marker="o", label="validation")
    loss_axes.set(xlabel="step", ylabel="weighted loss", title="Loss")
    loss_axes.legend()
    for k in range(len(val[0]["val_accuracy"]) if val else 0):
        accuracy_axes.plot(
            [r["step"] for r in val], [r["val_accuracy"][k] for r in val], marker="o", label=f"step {k + 1}"
        )
    accuracy_axes.set(xlabel="step", ylabel="top-1 accuracy", title="Validation accuracy per draft step", ylim=(0, 1))
    if val:
        accuracy_axes.legend()
    figure.savefig(png_path, dpi=100)


__all__ = [
    "Example",
    "FastMTPTrainingModule",
    "TrainConfig",
    "TrainError",
    "TrainResult",
    "collate_pairs",
    "load_distilled_examples",
    "load_reference_examples",
    "loss_weights",
    "precompute_hidden_states",
    "recursive_attention_mask",
    "recursive_head_outputs",
    "step_labels",
    "train",
]
