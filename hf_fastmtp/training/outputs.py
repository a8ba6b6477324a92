"""A training run's output folder: step checkpoints (crash-safe, exact on resume), the head, its summary and plot."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import shlex
import shutil
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..decoding.atomic_files import replaced_atomically
from ..decoding.modeling_fastmtp import FastMTPForCausalLM
from ..jsonl import read_rows
from ..run_settings import changed_settings
from . import TrainError
from .objective import loss_weights

if TYPE_CHECKING:
    from .data import DataReport
    from .train import TrainConfig, TrainingData, TrainingRun


LOG_NAME = "train_log.jsonl"
SUMMARY_NAME = "training_summary.json"
PLOT_NAME = "training.png"
CHECKPOINTS_DIR = "checkpoints"


@dataclass
class TrainState:
    """Progress saved with each checkpoint: optimizer steps done and where in which epoch the data stands."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    seconds: float = 0.0
    tokens: int = 0


logger = logging.getLogger(__name__)


def save_checkpoint(run: TrainingRun, target: Path) -> None:
    """
    Writes `target` (checkpoints/step-N) through a staging folder renamed into place, so that a checkpoint is complete
    or absent, then deletes the older ones. Only at optimizer-step boundaries: no gradient accumulation is in flight.
    """
    if run.accelerator.is_main_process and not target.exists():
        head_state = {name: tensor.detach().cpu().contiguous() for name, tensor in run.model.head.state_dict().items()}
        rng = {"python": random.getstate(), "torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        trainer = {"optimizer": run.optimizer.state_dict(), "scheduler": run.scheduler.state_dict(), "rng": rng}
        saved = {"state": dataclasses.asdict(run.state), "config": run.config.identity(), "data": run.data_fingerprint}
        target.parent.mkdir(parents=True, exist_ok=True)
        with replaced_atomically(target, folder=True) as staging:
            save_file(head_state, staging / "head.safetensors")
            torch.save(trainer, staging / "trainer.pt")
            (staging / "state.json").write_text(json.dumps(saved, indent=2), encoding="utf-8")
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
    if summary.get("final_validation"):  # where num_draft_tokens="auto" starts from
        model.config.draft_acceptance = [round(a, 4) for a in summary["final_validation"]["val_accuracy"]]
    with replaced_atomically(head_dir, folder=True) as staging:
        model.save_pretrained(staging, model_card_extra={"datasets": report.sources, "training": summary})
        # Kept with the head, so that a run continuing from it (--init) can record the whole lineage.
        (staging / SUMMARY_NAME).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")


def read_train_log(path: Path) -> list[dict]:
    """The records of train_log.jsonl, cutting off a torn last line that a run killed mid-write left."""
    return read_rows(path, ("step",), TrainError)


def write_summary(
    config: TrainConfig, data: TrainingData, state: TrainState, steps_per_epoch: int, accelerator
) -> dict:
    output = Path(config.output)
    records = read_train_log(output / LOG_NAME)
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
    if data.report.manifest is not None:
        manifest = data.report.manifest
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

    records = read_train_log(log_path)
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
