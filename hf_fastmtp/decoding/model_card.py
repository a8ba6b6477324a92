"""Model cards (README.md) for head folders and repos: what the head is for, its data, its acceptance, its use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import ModelCardData
from transformers import PretrainedConfig

from .mimo import SGLANG_BASE_TYPES


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
            "A [FastMTP](https://arxiv.org/abs/2509.18362) multi-token-prediction head: "
            f"{head_architecture(config)} that drafts tokens recursively (trained for {config.num_draft_tokens} per "
            "cycle) for "
            f"{base_text if base else 'its base model'}, which verifies "
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


def head_architecture(config: PretrainedConfig) -> str:
    """The head's configuration in words: MiMo's one layer, or the opt-in variants it uses."""
    layers = "one decoder layer" if config.num_head_layers == 1 else f"{config.num_head_layers} decoder layers"
    if config.feature_layers is None:
        return layers
    return (
        f"{layers} whose first draft step reads a learned fusion of the base's hidden states "
        f"{', '.join(map(str, config.feature_layers))} (EAGLE-3-style features; the last is its final hidden state)"
    )


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
        f"- {summary['steps']:,} optimizer step{'' if summary['steps'] == 1 else 's'} "
        f"({summary['epochs']:.2f} epochs) in {summary['seconds'] / 3600:.2f} h{hardware} "
        f"({summary['train_tokens_per_second']:.0f} response tokens/s); "
        f"loss weights per draft step {weights}.",
    ]
    config = summary.get("config") or {}
    targets = "the base model's greedy choices" if config.get("labels") == "base" else "the data's next tokens"
    objective = [f"targets: {targets}"]
    if config.get("feature_weight"):
        objective.append(f"feature regression weight {config['feature_weight']}")
    if config.get("soft_target_weight"):
        objective.append(f"soft targets: the base's distribution at weight {config['soft_target_weight']}")
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
```

Or on a model you have already loaded, as a Transformers `custom_generate` repo (the head loads once per model):

```python
model = AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}")
output = model.generate(**inputs, max_new_tokens=256, custom_generate="{repo_id}", trust_remote_code=True)
model.last_fastmtp_stats  # tau and acceptance of that call
```"""
    if config.draft_vocab_maps:
        text += (
            "\n\nDrafting is restricted to the frequent tokens of the prompt's language "
            f"(vocabulary maps: {', '.join(sorted(config.draft_vocab_maps))}); verification always uses the full "
            "vocabulary."
        )
    if config.text_config.model_type in SGLANG_BASE_TYPES and config.is_mimo_head():
        text += (
            "\n\nTo serve it at scale with SGLang: `fastmtp export --format sglang --head "
            f"{repo_id} --output DIR` writes a MiMo-style checkpoint and prints the launch command."
        )
    return text


def write_model_card(config: PretrainedConfig, folder: Path, extra: dict[str, Any] | None) -> None:
    (folder / "README.md").write_text(model_card(config, extra), encoding="utf-8")
