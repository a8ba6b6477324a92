"""`fastmtp train`: a FastMTP head trained on self-distilled data, with the base model frozen."""

from __future__ import annotations

import argparse
import dataclasses

from ..embedded import load_base
from ..training import TrainError
from ..training.processes import launched_processes
from ..training.train import HIDDEN_DTYPES, LABELS, TrainConfig, format_validation, train
from .args import BASE_HELP, add_gguf_file_argument


def register_cli(commands: argparse._SubParsersAction) -> None:
    """Adds the `train` subcommand to the `fastmtp` command line; `docs/training.md` explains every option."""
    defaults = TrainConfig(output="")
    parser = commands.add_parser(
        "train",
        help="train a FastMTP head on distilled data, base frozen (resumable)",
        description="Trains a FastMTP head with K-step recursive teacher forcing on the base model's own answers "
        "(`fastmtp distill`). Rerun the same command to resume an interrupted run.",
        formatter_class=_DefaultsHelpFormatter,
    )
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument(
        "--data",
        metavar="DIR_OR_ID",
        help="`fastmtp distill` output: its folder, a dataset folder or file of its rows, or a Hub dataset id",
    )
    data.add_argument(
        "--reference-data",
        metavar="PATH",
        help="instead: prompts JSONL with prompt and reference fields (the paper's fixed-data ablation)",
    )
    parser.add_argument("--output", metavar="DIR", required=True, help="hidden-state cache, checkpoints, log, head")
    parser.add_argument("--base", metavar="PATH_OR_ID", help=BASE_HELP)
    add_gguf_file_argument(parser)
    parser.add_argument(
        "-k", "--num-draft-tokens", metavar="K", type=int, default=defaults.num_draft_tokens, help="recursive steps"
    )
    parser.add_argument("--beta", type=float, default=defaults.beta, help="step weights beta^(k-1), normalised")
    parser.add_argument(
        "--loss-weights", metavar="W", type=float, nargs="+", help="one per step, overriding --beta (1 0 0: vanilla)"
    )
    parser.add_argument(
        "--epochs", type=float, default=defaults.epochs, help="passes over the data, may be fractional"
    )
    parser.add_argument("--max-steps", metavar="N", type=int, help="optimizer steps, overriding --epochs")
    parser.add_argument("--batch-size", metavar="N", type=int, default=defaults.batch_size, help="sequences per batch")
    parser.add_argument("--grad-accum", metavar="N", type=int, default=defaults.grad_accum, help="batches per step")
    parser.add_argument(
        "--lr", type=float, default=defaults.lr, help="peak learning rate, for a new head (~5e-5 to fine-tune one)"
    )
    parser.add_argument("--warmup-ratio", type=float, default=defaults.warmup_ratio, help="linear warmup, then cosine")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay, help="AdamW's")
    parser.add_argument("--max-grad-norm", type=float, default=defaults.max_grad_norm, help="gradient clipping")
    parser.add_argument("--max-rows", metavar="N", type=int, help="only the first N rows of the data")
    parser.add_argument("--max-seq-len", metavar="N", type=int, help="truncation (default: the base model's context)")
    parser.add_argument("--val-fraction", type=float, default=defaults.val_fraction, help="held out by row id hash")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="data order, random and LoRA initialisation")
    parser.add_argument(
        "--init",
        default=defaults.init,
        help="random, last-layer (a copy of the base's last layer: a poor start on SmolLM2, see docs/training.md), "
        "or a head folder to continue from",
    )
    parser.add_argument(
        "--feature-layers",
        metavar="I",
        type=int,
        nargs="+",
        help="EAGLE-3-style head: its first draft step reads a learned fusion of these base hidden states (indices "
        "into the base's hidden_states: 0 the embeddings, i after decoder layer i, -1 the final one, which must come "
        "last), e.g. 3 15 -1; with --init HEAD the fusion starts out reading the final state alone, as HEAD does",
    )
    parser.add_argument(
        "--head-layers",
        metavar="N",
        type=int,
        help="decoder layers in the head (default 1, MiMo's); with --init HEAD the added layers start out passing "
        "their input through, so the head drafts as HEAD does",
    )
    parser.add_argument(
        "--labels",
        choices=LABELS,
        default=defaults.labels,
        help="what each draft learns to predict: the data's next tokens, or the base model's own greedy choice there "
        "(what greedy verification accepts)",
    )
    parser.add_argument(
        "--feature-weight",
        type=float,
        default=defaults.feature_weight,
        help="add EAGLE's regression of each draft step's output onto the base's next hidden state, with this weight",
    )
    parser.add_argument(
        "--soft-target-weight",
        type=float,
        metavar="W",
        default=defaults.soft_target_weight,
        help="mix the base model's own next-token distribution into each target with this share (0 to 1): "
        "knowledge distillation, computed from the cached hidden states (one more lm_head product per step)",
    )
    parser.add_argument(
        "--loss-vocab-size",
        type=int,
        metavar="N",
        help="cross-entropy over the N most frequent response tokens only (several times faster on a CPU); draft "
        "with a vocabulary map of at most that size",
    )
    parser.add_argument(
        "--lora-rank", metavar="R", type=int, help="train LoRA adapters on the head, merged at the end"
    )
    parser.add_argument(
        "--mixed-precision",
        choices=("no", "bf16", "fp16"),
        default=defaults.mixed_precision,
        help="autocast, for GPUs",
    )
    parser.add_argument(
        "--hidden-dtype", choices=tuple(HIDDEN_DTYPES), default=defaults.hidden_dtype, help="cached hidden states"
    )
    parser.add_argument(
        "--hidden-cache",
        metavar="DIR",
        help="where the base's hidden states are cached (default: OUTPUT/hidden); runs on the same data can share "
        "one, each chunk is checked against the rows and the base before it is reused",
    )
    parser.add_argument("--eval-every", metavar="N", type=int, help="validation interval (default: 10 per run)")
    parser.add_argument("--save-every", metavar="N", type=int, default=defaults.save_every, help="checkpoint interval")
    parser.add_argument("--log-every", metavar="N", type=int, default=defaults.log_every, help="log interval")
    parser.set_defaults(func=cmd_train)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the defaults that exist (not "default: None")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def cmd_train(args: argparse.Namespace) -> None:
    names = {f.name for f in dataclasses.fields(TrainConfig)} - {"progress"}
    config = TrainConfig(**{name: getattr(args, name) for name in names})
    try:
        config.check()  # before the model loads, which can take half a minute
        processes = launched_processes(error=TrainError)  # so is a launch whose processes would each train alone
        # float32: AdamW keeps float32 master weights
        base, tokenizer, name = load_base(args.base, gguf_file=args.gguf_file)
        result = train(base, tokenizer, config, base_model_name_or_path=name)
    except TrainError as error:
        raise SystemExit(f"fastmtp train: error: {error}") from None
    if not processes.is_main_process:
        return  # the main process saved the head and reports
    final = result.summary.get("final_validation")
    if final:
        print(format_validation(final))
    print(f"Head saved in {result.head_dir}")
