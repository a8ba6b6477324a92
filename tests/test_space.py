"""The Gradio Space (space/app.py): its logic, its API through gradio_client, and the page in headless Chromium."""

from __future__ import annotations

import html
import importlib.util
import re
import socket
import sys
from collections.abc import Iterator
from itertools import chain
from pathlib import Path

import gradio as gr
import pytest
import torch
from conftest import kernel_entries, tiny_base, tiny_tokenizer
from gradio_client import Client
from test_distill import WORDS
from transformers import PreTrainedTokenizerFast

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.prompts import encode_chat

torch.set_num_threads(1)  # a light load on shared cores

REPO_ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
SCREENSHOT = REPO_ROOT / "test-artifacts" / "space.png"


def load_app():
    spec = importlib.util.spec_from_file_location("fastmtp_space_app", REPO_ROOT / "space" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


app = load_app()


def tiny_model() -> tuple[FastMTPForCausalLM, PreTrainedTokenizerFast]:
    """A tiny Llama whose head starts from the base's last layer: with this seed, some drafts are accepted."""
    tokenizer = tiny_tokenizer(WORDS)
    model = FastMTPForCausalLM.from_base(tiny_base("llama", vocab_size=len(tokenizer), seed=1))
    model.generation_config.num_draft_tokens = 3  # (as conftest's tiny models: "auto" would draft little here)
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def serve(model, tokenizer) -> Iterator[str]:
    """The app for `model` on a free local port; yields its URL and closes it afterwards."""
    demo = app.build_demo(model, tokenizer)
    app.launch(demo, prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture(scope="module")
def tiny_url(tiny) -> Iterator[str]:
    yield from serve(*tiny)


def panel_text(panel: str) -> str:
    """The text shown by an output panel's HTML."""
    return html.unescape(re.sub(r"<[^>]+>", "", panel))


def labels(panel: str) -> set[str]:
    """The classes of the spans in an output panel's HTML: "draft" and "model" mark FastMTP's tokens."""
    return set(re.findall(r'<span class="([^"]+)">', panel))


# ---------------------------------------------------------------------------------------------- logic


class FakeTokenizer:
    """Ids from 2 decode to letters; ids 0, 1 are the two halves of "é" (0 alone decodes as U+FFFD)."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        text = "".join("<" if i == 0 else ">" if i == 1 else chr(96 + i) for i in ids)
        return text.replace("<>", "é").replace("<", "\ufffd")


def test_transcript_labels_drafts_and_model_tokens():
    transcript = app.Transcript(FakeTokenizer(), mark_drafts=True)
    transcript.add_group([3])  # after the prefill: the model's own token
    transcript.add_group([4, 5, 6])  # two accepted drafts, then the model's token
    transcript.add_group([0, 1])  # a character in two tokens: it appears with the token that completes it
    assert transcript.pieces == [("c", "model"), ("d", "draft"), ("e", "draft"), ("f", "model"), ("é", "model")]
    assert transcript.text == "cdefé" and transcript.token_ids == [3, 4, 5, 6, 0, 1]

    plain = app.Transcript(FakeTokenizer(), mark_drafts=False)
    plain.add_group([3])
    plain.add_group([4])
    assert plain.pieces == [("c", None), ("d", None)]


def test_tokens_html_escapes_and_keeps_whitespace_outside_the_highlight():
    pieces = [(" a<b", "draft"), (" c", "draft"), ("\n", "model"), (" d", "model")]
    assert (
        app.tokens_html(pieces)
        == '<div class="tokens"> <span class="draft">a&lt;b c</span>\n <span class="model">d</span></div>'
    )
    assert app.tokens_html([(" plain", None)]) == '<div class="tokens"> plain</div>'
    assert "empty" in app.tokens_html([])


def test_streamer_puts_are_verification_cycles(tiny):
    model, tokenizer = tiny
    streamer = app.TokenGroupStreamer()
    output = model.generate(
        **encode_chat(tokenizer, "why is the sky blue"), max_new_tokens=40, fastmtp=True, streamer=streamer
    )
    groups = [streamer.groups.get() for _ in range(streamer.groups.qsize())]
    stats = model.last_fastmtp_stats
    assert list(chain.from_iterable(groups)) == output[0, -40:].tolist()
    # The first group is the prefill's token; each later one holds the accepted drafts and one token of the model.
    assert len(groups[0]) == 1 and sum(len(group) - 1 for group in groups) == stats.accepted_tokens > 0


def test_compare_streams_plain_then_fastmtp(tiny):
    model, tokenizer = tiny
    updates = list(app.compare("why is the sky blue", 40, 3, "full", 0.0, model=model, tokenizer=tokenizer))
    assert all(isinstance(update, app.Update) for update in updates)
    first_fastmtp = next(i for i, update in enumerate(updates) if update.fastmtp)
    assert all(update.plain for update in updates[first_fastmtp:])  # the plain run finished first

    final = updates[-1]
    details = final.details
    assert final.status.endswith("Done.") and details["greedy"] and details["identical"] is True
    assert (
        details["plain"]["text"] == details["fastmtp"]["text"] == panel_text(final.fastmtp) == panel_text(final.plain)
    )
    assert labels(final.plain) == set() and labels(final.fastmtp) == {"draft", "model"}
    assert details["plain"]["new_tokens"] == details["fastmtp"]["new_tokens"] == 40
    stats = details["fastmtp"]["stats"]
    assert details["tau"] == pytest.approx(stats["tau"]) and details["speedup"] > 0
    assert list(final.acceptance["acceptance"]) == pytest.approx(stats["acceptance_cumulative"])
    assert "identical" in final.summary and "×" in final.summary
    assert "speedup over stock Transformers" in final.summary and "tok/s stock → FastMTP" in final.summary


def test_plain_side_is_stock_transformers(tiny, monkeypatch):
    """The plain run enters none of this package's kernels: the speedup is over Transformers as it comes."""
    model, tokenizer = tiny
    entered = kernel_entries(monkeypatch)
    inputs = encode_chat(tokenizer, "why is the sky blue")
    plain = list(app.stream_generate(model, tokenizer, inputs, fastmtp=False, max_new_tokens=8, do_sample=False))
    assert plain[-1].run is not None and not entered
    list(app.stream_generate(model, tokenizer, inputs, fastmtp=True, max_new_tokens=8, do_sample=False))
    assert len(entered) == 1


def test_compare_sampling_reports_no_identity(tiny):
    model, tokenizer = tiny
    final = list(app.compare("why is the sky blue", 12, 2, "full", 0.8, model=model, tokenizer=tokenizer))[-1]
    assert final.details["greedy"] is False and final.details["identical"] is None
    assert final.details["fastmtp"]["new_tokens"] == 12 and "sampled" in final.summary


def test_confidence_gate_keeps_the_output(tiny):
    model, tokenizer = tiny
    final = list(app.compare("why is the sky blue", 16, 3, "full", 0.0, 1.0, model=model, tokenizer=tokenizer))[-1]
    assert final.details["identical"] is True
    assert sum(final.details["fastmtp"]["stats"]["drafted_per_position"]) == 0  # a gate of 1 never drafts
    with pytest.raises(gr.Error, match="confidence gate"):
        next(app.compare("hi", 16, 3, "full", 0.0, 1.5, model=model, tokenizer=tokenizer))


@pytest.mark.parametrize(
    "prompt, max_new_tokens, k, draft_vocab, temperature, message",
    [
        ("   ", 16, 3, "full", 0.0, "enter a prompt"),
        ("x" * (app.MAX_PROMPT_CHARS + 1), 16, 3, "full", 0.0, "limit is 2,000"),
        ("hi", 0, 3, "full", 0.0, "Max new tokens"),
        ("hi", 16, 9, "full", 0.0, "K must be 'auto' or between 1 and 8"),
        ("hi", 16, 3, "auto", 0.0, "Unknown draft vocabulary 'auto'"),
        ("hi", 16, 3, "full", -1.0, "Temperature"),
    ],
)
def test_bad_requests_explain_themselves(tiny, prompt, max_new_tokens, k, draft_vocab, temperature, message):
    model, tokenizer = tiny
    with pytest.raises(gr.Error, match=message):
        next(app.compare(prompt, max_new_tokens, k, draft_vocab, temperature, model=model, tokenizer=tokenizer))


def test_draft_vocab_choices_follow_the_maps():
    model, tokenizer = tiny_model()
    assert [value for _, value in app.draft_vocab_choices(model)] == ["full"]
    model.set_draft_vocab_maps({"all": torch.arange(len(tokenizer)), "en": torch.arange(20)}, default="all")
    assert [value for _, value in app.draft_vocab_choices(model)] == ["auto", "full", "all", "en"]

    final = list(app.compare("why is the sky blue", 8, 3, "en", 0.0, model=model, tokenizer=tokenizer))[-1]
    assert final.details["draft_vocab_size"] == 20 and final.details["identical"] is True


# ---------------------------------------------------------------------------------------------- API


def test_api_returns_both_outputs_and_figures(tiny_url):
    client = Client(tiny_url, verbose=False)
    result = client.predict("why is the sky blue", 32, 3, "full", 0, api_name="/compare")
    plain, plain_meta, fastmtp, fastmtp_meta, _, _, details, status = result
    assert panel_text(plain) == panel_text(fastmtp) == details["plain"]["text"] != ""
    assert labels(plain) == set() and labels(fastmtp) <= {"draft", "model"}
    assert details["identical"] is True and details["speedup"] > 0 and details["tau"] >= 1
    assert "tok/s" in plain_meta and "tok/s" in fastmtp_meta and status.endswith("Done.")


def test_api_reports_errors(tiny_url):
    client = Client(tiny_url, verbose=False)
    with pytest.raises(Exception, match="limit is 2,000"):
        client.predict("x" * 2500, 32, 3, "full", 0, api_name="/compare")


# ---------------------------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def real_url(smollm2) -> Iterator[str]:
    model, tokenizer = smollm2
    app.warm_up(model, tokenizer)
    yield from serve(model, tokenizer)


@pytest.mark.slow
def test_api_on_the_embedded_model(real_url):
    client = Client(real_url, verbose=False)
    result = client.predict("Why is the sky blue?", 24, 3, "full", 0, api_name="/compare")
    plain, _, fastmtp, _, _, _, details, status = result
    assert status.endswith("Done.") and details["identical"] is True
    assert panel_text(plain) == panel_text(fastmtp) == details["fastmtp"]["text"]
    assert "sky" in details["plain"]["text"].lower() or "light" in details["plain"]["text"].lower()
    assert details["speedup"] > 0 and details["tau"] >= 1 and details["fastmtp"]["new_tokens"] == 24


@pytest.mark.slow
def test_page_in_a_browser(real_url):
    if not CHROMIUM.is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install -y chromium)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto(real_url)
            page.locator("#run").click()  # no prompt yet: an error message, and the page stays usable
            expect(page.get_by_text("Please enter a prompt.")).to_be_visible()
            page.locator("#prompt textarea").fill("Give three tips for staying healthy.")
            tokens = page.locator("#max-new-tokens input[type=number]")
            tokens.fill("32")
            tokens.press("Enter")
            page.locator("#run").click()
            expect(page.locator("#status")).to_contain_text("Done.", timeout=300_000)

            plain = page.locator("#plain-output").inner_text()
            fastmtp = page.locator("#fastmtp-output").inner_text()
            assert plain.strip() and plain == fastmtp
            expect(page.locator("#summary")).to_contain_text("×")
            expect(page.locator("#summary")).to_contain_text("identical")
            SCREENSHOT.parent.mkdir(exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)
        finally:
            browser.close()
