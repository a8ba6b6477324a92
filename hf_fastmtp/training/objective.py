"""FastMTP's training objective: K-step recursive teacher forcing with one shared head, loss weights beta^(k-1)."""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    DynamicCache,
)

from ..decoding.configuration_fastmtp import check_num_draft_tokens
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..decoding.transformers_compat import attn_implementation
from . import TrainError

IGNORE_INDEX = -100
# Rows of [rows, vocab] logits computed at once by the loss: bounds its memory (512 x 49152 fp32 logits = 100 MB).
CE_CHUNK_ROWS = 512

logger = logging.getLogger(__name__)


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

    Step 1 reads the base's hidden state h_p (for a head with `feature_layers`: those layers' states concatenated,
    which it fuses); step k > 1 reads g_{k-1} at p-1. The tokens are the same at every step: with teacher forcing, the
    draft step k-1 fed at position p is the true t_{p+1}. All steps share one cache, so step
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
        output = model.mtp_forward(
            hidden, input_ids, position_ids, past_key_values=cache, attention_mask=mask, from_base=step == 1
        )
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


class SoftTargets(NamedTuple):
    """
    Per loss row: the base's hidden state whose lm_head distribution q is the soft target, and the share `w` of q in
    the target `(1 - w) * one_hot(label) + w * q` (0 where the row has no such hidden state).
    """

    teacher_hidden: torch.Tensor
    weight: torch.Tensor


def response_cross_entropy(
    model: FastMTPForCausalLM,
    head_outputs: torch.Tensor,
    labels: torch.LongTensor,
    loss_vocab: torch.LongTensor | None = None,
    soft_targets: SoftTargets | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    The loss of the frozen lm_head's logits of `head_outputs` [N, H] for `labels` [N]: summed cross-entropy, or with
    `soft_targets` the summed cross-entropy to their mixed targets; also the summed cross-entropy to `labels` alone
    and the top-1 hits. With `loss_vocab` (sorted token ids), over those rows of the lm_head only, and `labels` must
    be indices into it.
    """
    lm_head = model.get_output_embeddings()
    weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
    if loss_vocab is not None:
        weight = weight[loss_vocab]
        bias = None if bias is None else bias[loss_vocab]
    softcap = getattr(model.config.text_config, "final_logit_softcapping", None)
    with_grad = torch.is_grad_enabled() and head_outputs.requires_grad
    teacher_hidden, soft_weight = (None, None) if soft_targets is None else soft_targets
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.to(weight.device, weight.dtype)
    return LinearCrossEntropy.apply(
        head_outputs.to(weight.device), weight, bias, labels, softcap, with_grad, teacher_hidden, soft_weight
    )


class LinearCrossEntropy(torch.autograd.Function):
    """
    Summed cross-entropy and top-1 hits of `hidden @ weight.T + bias` (optionally soft-capped), with `weight` frozen.

    The [N, vocab] logits (49152 columns for SmolLM2) are the bulk of the training cost and memory. They are made in
    row chunks and the gradient with respect to `hidden` is computed right away, from each chunk's softmax, so no
    logits are kept for the backward pass and none are recomputed: one lm_head matmul forward and one (to H columns)
    for the gradient, against three for autograd through checkpointed chunks.

    With `teacher_hidden` [N, H] and `soft_weight` [N], row n's target is `(1 - w_n) * one_hot(label_n) + w_n * q_n`,
    q_n the same lm_head's softmax of `teacher_hidden[n]` (one more lm_head matmul, no gradient): cross-entropy to a
    mixed target is the mixed cross-entropies, and its gradient with respect to the logits is `softmax - target`.
    Returns the summed loss to the targets, the summed cross-entropy to the labels alone (what validation compares
    across recipes; the same number without soft targets) and the top-1 hits.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, with_grad, teacher_hidden=None, soft_weight=None):
        """`with_grad`: whether to compute the gradient for `hidden` (`ctx.needs_input_grad` ignores `no_grad`)."""
        if with_grad and weight.requires_grad:
            raise ValueError("LinearCrossEntropy needs a frozen lm_head: it computes no gradient for it.")
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        label_loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        hits = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad = torch.empty_like(hidden) if with_grad else None
        for start in range(0, labels.numel(), CE_CHUNK_ROWS):
            rows = slice(start, start + CE_CHUNK_ROWS)
            logits, capped = capped_logits(hidden[rows], weight, bias, softcap)
            log_norm = logits.logsumexp(dim=-1)
            targets = labels[rows, None]
            row_label_loss = log_norm - logits.gather(1, targets).squeeze(1)
            label_loss += row_label_loss.sum()
            hits += (logits.argmax(dim=-1) == labels[rows]).sum()
            target = None
            if teacher_hidden is None:
                loss += row_label_loss.sum()
            else:
                share = soft_weight[rows, None].float()
                teacher = capped_logits(teacher_hidden[rows], weight, bias, softcap)[0].softmax(dim=-1).mul_(share)
                target = teacher.scatter_add_(1, targets, 1 - share)
                loss += log_norm.sum() - (target * logits).sum()
            if grad is not None:
                # d(CE)/d(logits) = softmax - target (one_hot without soft targets), through tanh's derivative.
                grad_logits = logits.sub_(log_norm[:, None]).exp_()
                if target is None:
                    grad_logits.scatter_add_(1, targets, grad_logits.new_full(targets.shape, -1.0))
                else:
                    grad_logits -= target
                if softcap:
                    grad_logits *= 1 - capped.square()
                grad[rows] = grad_logits.to(weight.dtype) @ weight
        ctx.mark_non_differentiable(label_loss, hits)
        ctx.save_for_backward(grad)
        return loss, label_loss, hits

    @staticmethod
    def backward(ctx, grad_loss, grad_label_loss, grad_hits):
        (grad,) = ctx.saved_tensors
        return grad * grad_loss, None, None, None, None, None, None, None


def capped_logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """float32 logits of `hidden`, soft-capped where the base caps them; also tanh's output, for the gradient."""
    logits = F.linear(hidden, weight, bias).float()
    if not softcap:
        return logits, None
    capped = torch.tanh(logits / softcap)
    return capped * softcap, capped


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
    (`--labels base`), `feature_weight` adds EAGLE's feature regression, `soft_target_weight` mixes the base's own
    next-token distribution into each target (`--soft-target-weight`: knowledge distillation from the frozen base, free
    from the cached hidden states), and `loss_vocab` restricts the cross-entropy (and the top-1 hits) to those tokens
    (`--loss-vocab-size`). The logged per-step cross-entropy is always the one to the labels alone.
    """

    def __init__(
        self,
        model: FastMTPForCausalLM,
        weights: Sequence[float],
        base_labels: bool = False,
        feature_weight: float = 0.0,
        loss_vocab: torch.LongTensor | None = None,
        soft_target_weight: float = 0.0,
    ):
        super().__init__()
        self.model = model
        self.weights = list(weights)
        self.base_labels = base_labels
        self.feature_weight = feature_weight
        self.soft_target_weight = soft_target_weight
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
        features: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`features`: the selected layers' hidden states a head with `feature_layers` reads (`collate_pairs`)."""
        if self.base_labels:
            labels = base_greedy_labels(self.model, hidden_states, labels, pair_mask)
        loss_vocab = None
        if self.loss_vocab is not None:
            loss_vocab = self.loss_vocab.to(labels.device)
            inside = labels != IGNORE_INDEX
            labels = labels.masked_scatter(inside, self.vocab_index.to(labels.device)[labels[inside]])
        trained_steps = max(k + 1 for k, weight in enumerate(self.weights) if weight > 0)
        num_steps = len(self.weights) if all_steps else trained_steps
        head_input = hidden_states if features is None else features
        outputs = recursive_head_outputs(self.model, head_input.to(self.model.dtype), input_ids, pair_mask, num_steps)
        teacher = self.soft_targets(hidden_states, pair_mask) if self.soft_target_weight else None
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
            soft_targets = None if teacher is None else SoftTargets(*(part[selected] for part in teacher))
            summed, label_loss, hits = response_cross_entropy(
                self.model, output[selected], labels_k[selected], loss_vocab, soft_targets
            )
            loss = loss + weight * summed / count
            if self.feature_weight:
                loss = loss + weight * self.feature_weight * feature_loss(output, hidden_states, selected, pair_mask)
            stats[step - 1] = torch.stack([label_loss, hits.float(), label_loss.new_tensor(float(count))])
        return loss, stats

    def soft_targets(self, hidden_states: torch.Tensor, pair_mask: torch.BoolTensor) -> SoftTargets:
        """
        Per pair p: the base's hidden state h_{p+1}, whose lm_head distribution is the base's own for the token the
        head predicts at p, whatever the step; the last pair of a sequence has none and keeps its hard label.
        """
        teacher_hidden = F.pad(hidden_states[:, 1:], (0, 0, 0, 1))
        has_teacher = F.pad(pair_mask[:, 1:], (0, 1), value=False)
        return SoftTargets(teacher_hidden, has_teacher.to(torch.float32) * self.soft_target_weight)
