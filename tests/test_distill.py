"""Self-distillation on a tiny random Llama with a tiny word-level tokenizer: output, resume, crash safety, errors."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ARCHITECTURES, tiny_base, tiny_tokenizer
from test_core import chi_square_p_value
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from hf_fastmtp.cli.distill import register_cli
from hf_fastmtp.prompts import encode_chat
from hf_fastmtp.training.distill import (
    DistillError,
    TopKNucleusSampler,
    _answer,
    _token_chooser,
    distill,
    iter_distilled,
    load_prompts,
    read_manifest,
    select_prompts,
    selected_prompt_ids,
    tokenizer_fingerprint,
)

torch.set_num_threads(1)  # same numerics in the subprocess of the SIGKILL test, and a light load on shared cores

REPO_ROOT = Path(__file__).resolve().parent.parent
WORDS = (
    "give three tips for staying healthy what are the primary colors describe an atom how many clips did natalia "
    "sell write a python function to add two numbers sky is blue because of light 天空 为什么 是 蓝色 的"
).split()
PROMPTS = [
    ("alpaca_en-0", "alpaca_en", "en", "Give three tips for staying healthy."),
    ("alpaca_en-1", "alpaca_en", "en", "What are the three primary colors?"),
    ("alpaca_en-2", "alpaca_en", "en", "Describe an atom."),
    ("alpaca_en-3", "alpaca_en", "en", "Why is the sky blue?"),
    ("alpaca_zh-0", "alpaca_zh", "zh", "天空 为什么 是 蓝色 的"),
    ("alpaca_zh-1", "alpaca_zh", "zh", "为什么 天空 是 蓝色"),
    ("gsm8k_train-0", "gsm8k_train", "en", "How many clips did Natalia sell?"),
    ("code_alpaca-0", "code_alpaca", "en", "Write a python function to add two numbers."),
]
FAST = {"batch_size": 3, "max_new_tokens": 8, "temperature": 1.0, "progress": False}


def tiny_model_and_tokenizer() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = tiny_tokenizer(WORDS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # a stronger EOS, so that some answers end before max_new_tokens and some do not
        model.lm_head.weight[tokenizer.eos_token_id] *= 8
    return model, tokenizer


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


def write_prompts(path: Path, prompts=PROMPTS) -> Path:
    lines = [
        json.dumps({"id": i, "source": s, "lang": lang, "prompt": p, "reference": "-"}) for i, s, lang, p in prompts
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    return write_prompts(tmp_path / "prompts.jsonl")


def shard_bytes(folder: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in sorted(folder.glob("shard-*.jsonl"))}


def test_run_writes_rows_and_manifest(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    output = tmp_path / "out"
    result = distill(model, tokenizer, prompts_file, output, shard_size=3, model_name="tiny", **FAST)

    rows = list(iter_distilled(output))
    assert sorted(row["id"] for row in rows) == sorted(prompt[0] for prompt in PROMPTS)
    assert [path.name for path in sorted(output.glob("shard-*.jsonl"))] == [
        "shard-00000.jsonl",
        "shard-00001.jsonl",
        "shard-00002.jsonl",
    ]
    eos = tokenizer.eos_token_id
    by_id = {prompt[0]: prompt for prompt in PROMPTS}
    for row in rows:
        _, source, lang, prompt = by_id[row["id"]]
        assert (row["source"], row["lang"], row["prompt"]) == (source, lang, prompt)
        assert row["prompt_ids"] == encode_chat(tokenizer, prompt)["input_ids"][0].tolist()
        assert 1 <= len(row["response_ids"]) <= FAST["max_new_tokens"]
        assert eos not in row["response_ids"][:-1]
        assert row["finished"] == (row["response_ids"][-1] == eos)
        assert row["response"] == tokenizer.decode(row["response_ids"], skip_special_tokens=True)
    assert {row["finished"] for row in rows} == {True, False}

    manifest = read_manifest(output)
    assert manifest["model"] == "tiny"
    assert manifest["tokenizer"] == {"vocab_size": len(tokenizer), "fingerprint": tokenizer_fingerprint(tokenizer)}
    assert manifest["sampling"] == {"temperature": 1.0, "top_k": 20, "top_p": 0.95, "max_new_tokens": 8}
    assert manifest["runs"][0]["prompts_file"] == str(prompts_file)
    assert manifest["counts"] == {
        "rows": len(rows),
        "response_tokens": sum(len(row["response_ids"]) for row in rows),
        "finished": sum(row["finished"] for row in rows),
        "duplicates_dropped": 0,
        "skipped_too_long": 0,
    }
    assert result.new_rows == len(rows) and "8 new rows" in result.summary()


def test_rerun_is_a_no_op(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    output = tmp_path / "out"
    distill(model, tokenizer, prompts_file, output, **FAST)
    before, manifest = shard_bytes(output), read_manifest(output)
    result = distill(model, tokenizer, prompts_file, output, **FAST)
    assert result.new_rows == 0 and result.generated_tokens == 0
    assert shard_bytes(output) == before
    assert read_manifest(output) == manifest


def test_resume_after_torn_write_matches_uninterrupted_run(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    distill(model, tokenizer, prompts_file, reference, shard_size=4, **FAST)
    shutil.copytree(reference, resumed)
    # 8 prompts in batches of 3: the last batch is the last 2 rows. Cut it off, leaving half of its first row, as a
    # kill in the middle of its write would.
    last_shard = resumed / "shard-00001.jsonl"
    lines = last_shard.read_bytes().splitlines(keepends=True)
    last_shard.write_bytes(b"".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])

    result = distill(model, tokenizer, prompts_file, resumed, shard_size=4, **FAST)
    assert result.new_rows == 2
    assert shard_bytes(resumed) == shard_bytes(reference)
    assert read_manifest(resumed)["counts"] == read_manifest(reference)["counts"]


SUBPROCESS_RUN = """
import sys, time
sys.path[:0] = [{tests!r}, {root!r}]
from test_distill import FAST, tiny_model_and_tokenizer
from hf_fastmtp.training.distill import distill
model, tokenizer = tiny_model_and_tokenizer()
model.register_forward_hook(lambda *args: time.sleep(0.1))  # slow enough to be killed mid-run
distill(model, tokenizer, {prompts!r}, {output!r}, **{{**FAST, "batch_size": 2}})
"""


def test_resume_after_sigkill_loses_and_duplicates_nothing(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    killed, reference = tmp_path / "killed", tmp_path / "reference"
    script = SUBPROCESS_RUN.format(
        tests=str(REPO_ROOT / "tests"), root=str(REPO_ROOT), prompts=str(prompts_file), output=str(killed)
    )
    process = subprocess.Popen([sys.executable, "-c", script], cwd=REPO_ROOT)
    shard = killed / "shard-00000.jsonl"
    deadline = time.monotonic() + 120
    while not (shard.exists() and shard.read_bytes().count(b"\n") >= 2):
        assert process.poll() is None, "the distill subprocess ended before it could be killed"
        assert time.monotonic() < deadline, "the distill subprocess wrote nothing in time"
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert len(list(iter_distilled(killed))) < len(PROMPTS), "killed too late to test anything"

    options = {**FAST, "batch_size": 2}
    distill(model, tokenizer, prompts_file, killed, **options)
    distill(model, tokenizer, prompts_file, reference, **options)
    assert list(iter_distilled(killed)) == list(iter_distilled(reference))
    assert read_manifest(killed)["counts"] == read_manifest(reference)["counts"]


def test_identical_responses_are_dropped_and_not_regenerated(tiny, tmp_path):
    model, tokenizer = tiny
    same = "Why is the sky blue?"
    prompts = write_prompts(tmp_path / "p.jsonl", [(f"q-{n}", "alpaca_en", "en", same) for n in range(4)])
    output = tmp_path / "out"
    result = distill(model, tokenizer, prompts, output, **{**FAST, "temperature": 0.0})
    assert result.new_rows == 1 and result.duplicates_dropped == 3
    [kept] = iter_distilled(output)
    duplicates = [json.loads(line) for line in (output / "duplicates.jsonl").read_text().splitlines()]
    assert sorted(row["id"] for row in duplicates) == sorted({"q-0", "q-1", "q-2", "q-3"} - {kept["id"]})
    assert all(row["duplicate_of"] == kept["id"] for row in duplicates)
    assert read_manifest(output)["counts"]["duplicates_dropped"] == 3

    rerun = distill(model, tokenizer, prompts, output, **{**FAST, "temperature": 0.0})
    assert rerun.generated_tokens == 0 and read_manifest(output)["counts"]["duplicates_dropped"] == 3


def test_too_long_prompts_are_skipped_and_counted(tiny, prompts_file, tmp_path, caplog):
    model, tokenizer = tiny
    lengths = {i: len(encode_chat(tokenizer, p)["input_ids"][0]) for i, _, _, p in PROMPTS}
    limit = sorted(lengths.values())[-3]
    too_long = {i for i, length in lengths.items() if length > limit}
    result = distill(model, tokenizer, prompts_file, tmp_path / "out", max_prompt_tokens=limit, **FAST)
    assert result.skipped_too_long == len(too_long) > 0
    assert {row["id"] for row in iter_distilled(tmp_path / "out")} == set(lengths) - too_long
    assert read_manifest(tmp_path / "out")["counts"]["skipped_too_long"] == len(too_long)
    assert f"Skipping {len(too_long)} prompts longer than {limit} tokens" in caplog.text


def test_other_settings_or_tokenizer_are_refused(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    output = tmp_path / "out"
    distill(model, tokenizer, prompts_file, output, **FAST)
    with pytest.raises(DistillError, match=r"other settings.*temperature"):
        distill(model, tokenizer, prompts_file, output, **{**FAST, "temperature": 0.7})
    other_tokenizer = tiny_tokenizer(WORDS)
    other_tokenizer.add_tokens(["extra"])
    with pytest.raises(DistillError, match="tokenizer"):
        distill(model, other_tokenizer, prompts_file, output, **FAST)
    with pytest.raises(DistillError, match="model '' there, 'other' now"):
        distill(model, tokenizer, prompts_file, output, model_name="other", **FAST)
    # Other prompts, filters or batch sizes are fine: they add rows of the same distribution.
    distill(model, tokenizer, prompts_file, output, **{**FAST, "batch_size": 2, "langs": ["zh"]})
    assert len(read_manifest(output)["runs"]) == 2


def test_shards_without_manifest_are_refused(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "shard-00000.jsonl").write_text("")
    with pytest.raises(DistillError, match=r"no manifest\.json"):
        distill(model, tokenizer, prompts_file, tmp_path / "out", **FAST)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        ('{"id": "a", "source": "s", "lang": "en", "prompt": "hi"}\n{"id": "b", "source"\n', "line 2: not valid JSON"),
        ('{"id": "a", "source": "s", "lang": "en"}\n', "line 1: no prompt column"),
        ('{"id": "a", "source": "s", "lang": "en", "prompt": "  "}\n', "line 1: the prompt is empty"),
        ('["a", "s", "en", "hi"]\n', "line 1: not an object with a prompt"),
        ('{"id": "a", "source": "s", "lang": "en", "prompt": "x"}\n' * 2, "line 2: id 'a' is already used on line 1"),
    ],
)
def test_bad_prompts_files(tmp_path, content, message):
    path = tmp_path / "prompts.jsonl"
    path.write_text(content)
    with pytest.raises(DistillError, match=message) as error:
        load_prompts(path)
    assert str(path) in str(error.value)


def test_missing_prompts_file(tmp_path):
    with pytest.raises(DistillError, match="not found"):
        load_prompts(tmp_path / "nowhere.jsonl")


def test_selection_filters_and_is_a_stable_prefix(prompts_file):
    prompts = load_prompts(prompts_file)
    assert {p["id"] for p in select_prompts(prompts, langs=["zh"])} == {"alpaca_zh-0", "alpaca_zh-1"}
    assert {p["id"] for p in select_prompts(prompts, sources=["gsm8k_train", "code_alpaca"])} == {
        "gsm8k_train-0",
        "code_alpaca-0",
    }
    everything = select_prompts(prompts, seed=3)
    assert sorted(p["id"] for p in everything) == sorted(p["id"] for p in prompts)
    assert select_prompts(prompts, num_prompts=5, seed=3) == everything[:5]
    assert select_prompts(prompts, num_prompts=5, seed=3) != select_prompts(prompts, num_prompts=5, seed=4)
    with pytest.raises(DistillError, match=r"No prompt has source \['wiki'\]"):
        select_prompts(prompts, sources=["wiki"])
    with pytest.raises(DistillError, match="No prompt is left"):
        select_prompts(prompts, sources=["alpaca_zh"], langs=["en"])
    with pytest.raises(DistillError, match="only 8 prompts"):
        select_prompts(prompts, num_prompts=9)


@pytest.mark.parametrize(
    "option, message",
    [
        ({"batch_size": 0}, "batch_size must be at least 1"),
        ({"num_prompts": 0}, "num_prompts must be at least 1"),
        ({"temperature": -1.0}, "temperature must be >= 0"),
        ({"top_p": 0.0}, "top_p must be in"),
        ({"top_k": -1}, "top_k must be >= 0"),
    ],
)
def test_bad_options(tiny, prompts_file, tmp_path, option, message):
    model, tokenizer = tiny
    with pytest.raises(DistillError, match=message):
        distill(model, tokenizer, prompts_file, tmp_path / "out", **{**FAST, **option})
    assert not (tmp_path / "out").exists()


def test_selected_prompt_ids_hold_out_everything_the_runs_selected(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    output = tmp_path / "out"
    distill(model, tokenizer, prompts_file, output, num_prompts=5, seed=3, **FAST)
    # Interrupted after the first batch: the unanswered rest of the selection is still not held out.
    shard = output / "shard-00000.jsonl"
    shard.write_text("".join(shard.read_text(encoding="utf-8").splitlines(keepends=True)[:3]), encoding="utf-8")
    selection = select_prompts(load_prompts(prompts_file), num_prompts=5, seed=3)
    assert selected_prompt_ids(output) == {prompt["id"] for prompt in selection}
    assert len(selection) == 5 < len(PROMPTS)


def test_iter_distilled_errors(tiny, prompts_file, tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        list(iter_distilled(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no shard"):
        list(iter_distilled(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match=r"manifest\.json not found"):
        read_manifest(tmp_path / "empty")

    model, tokenizer = tiny
    output = tmp_path / "out"
    distill(model, tokenizer, prompts_file, output, **FAST)
    shard = output / "shard-00000.jsonl"
    lines = shard.read_text().splitlines(keepends=True)
    shard.write_text("".join([lines[0], '{"id": "broken"\n', *lines[1:]]))
    with pytest.raises(DistillError, match=r"shard-00000.jsonl, line 2"):
        list(iter_distilled(output))
    with pytest.raises(DistillError, match=r"shard-00000.jsonl, line 2"):
        distill(model, tokenizer, prompts_file, output, **FAST)


def test_iter_distilled_skips_a_row_being_written(tiny, prompts_file, tmp_path):
    model, tokenizer = tiny
    distill(model, tokenizer, prompts_file, tmp_path / "out", **FAST)
    with open(tmp_path / "out" / "shard-00000.jsonl", "a") as shard:
        shard.write('{"id": "half-writ')
    assert len(list(iter_distilled(tmp_path / "out"))) == len(PROMPTS)


def cli_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastmtp")
    register_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_cli_defaults():
    args = cli_parser().parse_args(["distill", "--output", "out"])
    assert args.prompts is None and args.push_to_hub is None  # no prompts ship: the command says what to pass
    assert (args.batch_size, args.max_new_tokens, args.shard_size, args.max_prompt_tokens) == (32, 256, 1000, 512)
    assert (args.temperature, args.top_k, args.top_p, args.seed) == (0.6, 20, 0.95, 0)
    assert args.source is None and args.lang is None and args.num_prompts is None and args.base is None
    assert args.dtype == "auto" and args.device == "auto"


def test_cli_end_to_end(tiny, prompts_file, tmp_path, capsys):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base, output = str(tmp_path / "base"), str(tmp_path / "out")
    argv = ["distill", "--base", base, "--prompts", str(prompts_file), "--output", output, "--num-prompts", "3"]
    argv += ["--source", "alpaca_en", "--source", "alpaca_zh", "--lang", "en", "--batch-size", "2"]
    argv += ["--max-new-tokens", "4", "--dtype", "bfloat16"]
    args = cli_parser().parse_args(argv)
    args.func(args)
    assert "3 new rows" in capsys.readouterr().out
    assert {row["source"] for row in iter_distilled(tmp_path / "out")} == {"alpaca_en"}
    manifest = read_manifest(tmp_path / "out")
    assert manifest["model"] == str(tmp_path / "base")
    assert manifest["runs"][0]["sources"] == ["alpaca_en", "alpaca_zh"]
    assert manifest["runs"][0]["dtype"] == "bfloat16"
    assert manifest["tokenizer"]["fingerprint"] == tokenizer_fingerprint(tokenizer)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--prompts", "missing.jsonl"], "Prompts file missing.jsonl not found"),
        (["--top-p", "1.5"], "top_p must be in"),
        (["--batch-size", "0"], "batch_size must be at least 1"),
        (["--device", "gpu"], "--device: .*gpu"),
    ],
)
def test_cli_errors_before_loading_a_model(tmp_path, prompts_file, argv, message):
    args = cli_parser().parse_args(
        ["distill", "--output", str(tmp_path / "out"), "--prompts", str(prompts_file), *argv]
    )
    args.base = str(tmp_path / "no-model-here")  # would fail loudly if the model were loaded first
    with pytest.raises(SystemExit, match=message):
        args.func(args)


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(0.6, 20, 0.95), (1.0, 5, 1.0), (0.8, 50, 0.5), (2.0, 3, 0.7)]
)
def test_top_k_sampler_draws_from_transformers_sampling_distribution(temperature, top_k, top_p):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(40, generator=torch.Generator().manual_seed(top_k)) * 2
    warpers = LogitsProcessorList(
        [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k), TopPLogitsWarper(top_p)]
    )
    expected = warpers(None, logits[None].clone())[0].softmax(-1).double()
    assert (expected > 0).sum() >= 2  # a real choice is left to sample

    num_samples = 20_000
    sampler = TopKNucleusSampler(temperature, top_k, top_p, torch.Generator().manual_seed(0))
    samples = sampler(logits.expand(num_samples, -1).clone())
    assert set(samples.tolist()) <= set(expected.nonzero().flatten().tolist())
    assert chi_square_p_value(samples, expected) > 1e-3


def test_sampler_is_seeded_by_its_generator():
    logits = torch.randn(8, 100, generator=torch.Generator().manual_seed(0))
    draws = [TopKNucleusSampler(0.6, 20, 0.95, torch.Generator().manual_seed(7))(logits) for _ in "ab"]
    assert torch.equal(*draws)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_answers_are_generate_less_the_rows_that_ended(architecture):
    model = tiny_base(architecture)
    generator = torch.Generator().manual_seed(1)
    batch = [
        {"prompt_ids": torch.randint(1, 97, (length,), generator=generator).tolist()} for length in (5, 9, 3, 7, 4, 6)
    ]
    max_new_tokens = 20
    width = max(len(prompt["prompt_ids"]) for prompt in batch)
    input_ids = torch.tensor([[0] * (width - len(p["prompt_ids"])) + p["prompt_ids"] for p in batch])
    attention_mask = (
        torch.arange(width) >= width - torch.tensor([len(p["prompt_ids"]) for p in batch])[:, None]
    ).long()

    def generate(eos_ids: list[int] | None) -> list[list[int]]:
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos_ids,
            pad_token_id=0,
        )
        return output[:, width:].tolist()

    # An EOS id that ends some rows at different steps and never comes in others, which run to max_new_tokens.
    unstopped = generate(None)
    for eos_id in sorted(set(sum(unstopped, []))):
        ends = {ids.index(eos_id) for ids in unstopped if eos_id in ids}
        if len(ends) >= 2 and any(eos_id not in ids for ids in unstopped):
            break
    expected = []
    for ids in generate([eos_id]):
        end = ids.index(eos_id) if eos_id in ids else None
        expected.append((ids, False) if end is None else (ids[: end + 1], True))
    assert len({len(ids) for ids, finished in expected if finished}) >= 2  # rows leave the batch at different steps
    assert not all(finished for _, finished in expected)

    answers = _answer(model, batch, _token_chooser(0.0, 20, 0.95, 0, model.device), [eos_id], 0, max_new_tokens)
    assert answers == expected


def test_full_vocabulary_nucleus_draws_from_transformers_distribution():
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

    logits = torch.randn(40, generator=torch.Generator().manual_seed(3)) * 2
    expected = TopPLogitsWarper(0.8)(None, TemperatureLogitsWarper(0.7)(None, logits[None].clone()))[0]
    expected = expected.softmax(-1).double()
    choose = _token_chooser(0.7, 0, 0.8, seed=5, device=torch.device("cpu"))
    samples = choose(logits.expand(20_000, -1).clone())
    assert set(samples.tolist()) <= set(expected.nonzero().flatten().tolist())
    assert chi_square_p_value(samples, expected) > 1e-3
    assert torch.equal(
        samples, _token_chooser(0.7, 0, 0.8, seed=5, device=torch.device("cpu"))(logits.expand(20_000, -1))
    )
