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
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    get_cosine_schedule_with_warmup,
)

from ..decoding.configuration_fastmtp import check_num_draft_tokens, resolve_feature_layers
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..decoding.transformers_compat import initialize_weights
from ..jsonl import append_rows, write_rows
from ..prompt_sources import looks_like_hub_id
from . import TrainError
from .data import DataReport, Example, is_validation, load_distilled_examples, load_reference_examples
from .hidden_states import HiddenStateStore, LengthGroupedBatches, PairDataset, collate_pairs, precompute_hidden_states
from .objective import FastMTPTrainingModule, loss_weights
from .outputs import (
    CHECKPOINTS_DIR,
    LOG_NAME,
    PLOT_NAME,
    TrainState,
    plot_training_log,
    read_train_log,
    resume,
    save_checkpoint,
    save_head,
    write_summary,
)
from .processes import launched_processes

logger = logging.getLogger(__name__)

LABELS = ("data", "base")
HIDDEN_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


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
    feature_layers: list[int] | None = None
    head_layers: int | None = None
    labels: str = "data"
    feature_weight: float = 0.0
    soft_target_weight: float = 0.0
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
        if self.data is not None and not Path(self.data).exists() and not looks_like_hub_id(self.data):
            raise TrainError(
                f"--data folder {self.data} not found: run `fastmtp distill --output {self.data}` first, or give a "
                "dataset folder or file of its rows, or a Hub dataset id."
            )
        if self.reference_data is not None and not Path(self.reference_data).is_file():
            raise TrainError(f"--reference-data file {self.reference_data} not found.")
        positive = {
            "batch_size": self.batch_size,
            "grad_accum": self.grad_accum,
            "max_steps": self.max_steps,
            "max_rows": self.max_rows,
            "lora_rank": self.lora_rank,
            "head_layers": self.head_layers,
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
        if not 0 <= self.soft_target_weight <= 1:
            raise TrainError(
                f"soft_target_weight must be in [0, 1] (the base distribution's share of each target), got "
                f"{self.soft_target_weight}."
            )
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
    Runs as is under `accelerate launch` or `torchrun` on several processes (data-parallel: each takes every N-th
    batch, so that N processes train the head that one trains with N times the gradient accumulation).
    """
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    config.check()
    # Refuses a launch whose processes would each train alone, all writing the same folder.
    launched_processes(error=TrainError)
    Path(config.output).mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    data = prepare_data(base, tokenizer, config, accelerator, head_feature_layers(base, config))
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
    base: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: TrainConfig,
    accelerator,
    feature_layers: list[int] | None = None,
) -> TrainingData:
    """
    Loads and splits the examples, and precomputes the base model's hidden states for all of them (those of
    `feature_layers` for a head that reads several).
    """
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
        feature_layers=feature_layers,
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
                soft_target_weight=config.soft_target_weight,
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


def head_feature_layers(base: PreTrainedModel, config: TrainConfig) -> list[int] | None:
    """
    The base's hidden states the trained head reads (`FastMTPConfig.feature_layers`, as indices from 0):
    --feature-layers, else the --init head's. What the hidden-state cache stores.
    """
    feature_layers = config.feature_layers
    if feature_layers is None and config.init not in ("last-layer", "random"):
        feature_layers = json.loads((Path(config.init) / "config.json").read_text()).get("feature_layers")
    if feature_layers is None:
        return None
    try:
        return resolve_feature_layers(feature_layers, base.config.num_hidden_layers)
    except ValueError as error:
        raise TrainError(f"--feature-layers: {error}") from None


def build_model(base: PreTrainedModel, config: TrainConfig, base_model_name_or_path: str | None) -> FastMTPForCausalLM:
    """
    The model with its starting head: `random`, the base's last layer (`last-layer`), or a saved head folder, which
    `--feature-layers` and `--head-layers` expand into a head that starts out drafting as it does
    (`FastMTPForCausalLM.expand_head`).
    """
    if config.init not in ("last-layer", "random"):
        model = FastMTPForCausalLM.from_pretrained(config.init, base_model=base)
        model.config.num_draft_tokens = config.num_draft_tokens
        if config.feature_layers is not None or config.head_layers is not None:
            try:
                model.expand_head(feature_layers=config.feature_layers, num_head_layers=config.head_layers)
            except ValueError as error:
                raise TrainError(str(error)) from None
    else:
        model = FastMTPForCausalLM.from_base(
            base,
            num_draft_tokens=config.num_draft_tokens,
            base_model_name_or_path=base_model_name_or_path,
            feature_layers=head_feature_layers(base, config),
            num_head_layers=config.head_layers or 1,
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
            kept = [record for record in read_train_log(self.path) if step > 0 and record["step"] <= step]
            write_rows(self.path, kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            append_rows(self.path, [record])


__all__ = ["HIDDEN_DTYPES", "LABELS", "TrainConfig", "TrainResult", "format_validation", "train"]
