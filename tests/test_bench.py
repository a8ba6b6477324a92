"""`fastmtp bench`: metric arithmetic on hand-made records, a tiny end-to-end run, resuming, and the CLI options."""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import kernel_entries, tiny_base, tiny_tokenizer

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.bench import metrics, report
from hf_fastmtp.bench import run as bench
from hf_fastmtp.bench.metrics import BenchError, aggregate
from hf_fastmtp.bench.report import render_markdown
from hf_fastmtp.bench.run import build_modes, load_questions, run_bench
from hf_fastmtp.cli import bench as bench_cli
from hf_fastmtp.cli import build_parser
from hf_fastmtp.cli.args import load_model, lookup_kwargs, resolve_confidence_threshold, resolve_device
from hf_fastmtp.cli.bench import register_cli
from hf_fastmtp.decoding.stats import FastMTPStats

torch.set_num_threads(1)  # a light load on shared cores

# ---------------------------------------------------------------------------------------------- metrics


def stats(drafted: list[int], accepted: list[int], cycles: int, reached: list[int] | None = None) -> dict:
    """Counts of `cycles` cycles; unless given, every cycle drafts to the end (reached: accepted up to k-1)."""
    reached = reached or drafted[:1] + accepted[:-1]
    return FastMTPStats(
        len(drafted),
        cycles,
        drafted,
        accepted,
        reached,
        head_steps=sum(drafted),
        draft_seconds=0.1,
        verify_seconds=0.2,
    ).to_dict()


def record(question_id, category, mode, ids, seconds, stats=None) -> dict:
    method = mode if mode in bench.METHODS else mode.split("-")[0]
    options = {"num_draft_tokens": 2, "draft_vocab": "full"} if method == "fastmtp" else {}
    return {
        "question_id": question_id,
        "category": category,
        "mode": mode,
        "method": method,
        "options": options,
        "new_token_ids": ids,
        "seconds": seconds,
        "stats": stats,
    }


FM = "fastmtp-k2-full"
STOCK = "ar-stock"  # the reference: plain decoding in stock Transformers
RECORDS = [
    record(1, "a", STOCK, [1, 2, 3, 4], 2.0),
    record(1, "a", "ar", [1, 2, 3, 4], 1.6),  # plain decoding under the package's kernels: the second column
    record(1, "a", FM, [1, 2, 3, 4], 1.0, stats([3, 3], [2, 1], cycles=3)),
    record(1, "a", "pld-10", [1, 2, 3, 4], 1.6),
    record(2, "a", STOCK, [5, 6], 1.0),
    record(2, "a", FM, [5, 6], 0.5, stats([1, 1], [1, 0], cycles=1)),
    record(2, "a", "pld-10", [5, 7], 1.0),  # differs from the reference at token 1
    record(3, "b", STOCK, [7, 8, 9], 3.0),
    record(3, "b", FM, [7, 8, 9], 2.0, stats([2, 2], [1, 1], cycles=2)),
    record(4, "b", FM, [1], 0.5, stats([1, 1], [0, 0], cycles=1)),  # no reference record: not in the speedup
]


def test_aggregate_hand_computed():
    results = aggregate(RECORDS)
    assert metrics.REFERENCE == results["reference"] == STOCK
    assert results["modes"] == [STOCK, "ar", FM, "pld-10"]
    assert results["categories"] == ["a", "b"]

    overall = results["by_mode"][FM]["overall"]
    assert overall["prompts"] == 4 and overall["new_tokens"] == 10 and overall["seconds"] == pytest.approx(4.0)
    assert overall["tokens_per_second"] == pytest.approx(10 / 4.0)
    assert overall["speedup"] == pytest.approx((2.0 + 1.0 + 3.0) / (1.0 + 0.5 + 2.0))  # question 4: no reference run
    assert overall["cycles"] == 7
    assert overall["tau"] == pytest.approx((6 + 7) / 7)  # (accepted drafts + cycles) / cycles
    assert overall["drafted_per_position"] == [7, 7] and overall["accepted_per_position"] == [4, 2]
    # Ratios of summed counts: the mean of per-prompt ratios (2/3, 1, 1/2, 0 at position 1) would be 0.54, not 4/7.
    assert overall["acceptance_cumulative"] == pytest.approx([4 / 7, 2 / 7])
    assert overall["acceptance_conditional"] == pytest.approx([4 / 7, 2 / 4])
    assert overall["draft_seconds"] == pytest.approx(0.4) and overall["verify_seconds"] == pytest.approx(0.8)
    assert overall["draft_ms_per_step"] == pytest.approx(1000 * 0.4 / 14)  # 14 drafted tokens, one head step each

    category_a = results["by_mode"][FM]["categories"]["a"]
    assert category_a["speedup"] == pytest.approx(3.0 / 1.5)
    assert category_a["tau"] == pytest.approx((4 + 4) / 4)
    assert category_a["acceptance_cumulative"] == pytest.approx([3 / 4, 1 / 4])
    assert category_a["acceptance_conditional"] == pytest.approx([3 / 4, 1 / 3])
    assert results["by_mode"][FM]["categories"]["b"]["speedup"] == pytest.approx(3.0 / 2.0)

    pld = results["by_mode"]["pld-10"]
    assert pld["overall"]["speedup"] == pytest.approx(3.0 / 2.6)
    assert pld["overall"]["tokens_per_second"] == pytest.approx(6 / 2.6)
    assert "tau" not in pld["overall"] and "b" not in pld["categories"]
    assert results["by_mode"][STOCK]["overall"]["speedup"] == pytest.approx(1.0)
    kernels = results["by_mode"]["ar"]
    assert kernels["overall"]["speedup"] == pytest.approx(2.0 / 1.6) and list(kernels["categories"]) == ["a"]


def test_acceptance_of_gated_cycles_and_of_older_records():
    """Gated cycles draft fewer positions, so `reached` is counted, not derived; older records still aggregate."""
    # 4 cycles: one plain step, drafts (1 of 1), (2 of 2), (1 of 2) accepted.
    gated = stats([3, 2, 0], [2, 1, 0], cycles=4, reached=[3, 2, 0])
    gated["head_steps"] = 5 + 3  # three cycles computed a draft they dropped
    legacy = stats([2, 2], [1, 0], cycles=2)
    del legacy["reached_per_position"], legacy["head_steps"]
    summary = metrics.acceptance([gated, legacy])
    assert summary["tau"] == pytest.approx((3 + 1 + 6) / 6)
    assert summary["drafted_per_position"] == [5, 4, 0]
    assert summary["acceptance_conditional"] == pytest.approx([3 / 5, 1 / 3, None])
    assert summary["draft_ms_per_step"] == pytest.approx(1000 * 0.2 / (8 + 4))


def test_lookup_cycles_count_in_tau_not_in_the_heads_acceptance():
    with_lookup = stats([2, 2], [1, 0], cycles=4)  # two head cycles, and two that drafted by prompt lookup:
    with_lookup.update(lookup_cycles=2, lookup_drafted=10, lookup_accepted=7)
    summary = metrics.acceptance([with_lookup, stats([2, 2], [2, 1], cycles=2)])
    assert summary["tau"] == pytest.approx((1 + 3 + 7 + 6) / 6)
    assert summary["acceptance_cumulative"] == pytest.approx([3 / 4, 1 / 4])
    assert (summary["lookup_cycles"], summary["lookup_drafted"], summary["lookup_accepted"]) == (2, 10, 7)
    assert "lookup" in report.acceptance_table({"by_mode": {FM: {"overall": summary}}})


def test_lossless_counts_and_lists_mismatches():
    check = aggregate(RECORDS)["lossless"]
    assert check["compared"] == 6  # ar on 1, FastMTP on 1-3, pld on 1-2; question 4 has nothing to compare with
    assert check["mismatches"] == [{"question_id": 2, "category": "a", "mode": "pld-10", "first_difference": 1}]
    assert check["identical"] is False
    assert aggregate([r for r in RECORDS if r["mode"] != "pld-10"])["lossless"]["identical"] is True


def test_markdown_tables():
    results = {
        "settings": {
            "model": {"base": "tiny", "head_sha256": "0" * 16, "dtype": "float32"},
            "max_new_tokens": 4,
            "questions": "q.jsonl",
            "per_category": None,
        },
        "hardware": {"cpu": "cpu", "threads": 1, "torch": "2", "transformers": "5", "device": "cpu"},
        **aggregate(RECORDS),
    }
    text = render_markdown(results)
    lines = text.splitlines()
    header = next(line for line in lines if line.startswith("| category"))
    # The reference first, with its tok/s only; then `ar`, with its speedup over stock like every other mode.
    cells = [cell.strip() for cell in header.split("|")[2:-1]]
    assert cells[:3] == [
        "plain, stock Transformers tok/s",
        "plain, hf_fastmtp kernels speedup",
        "plain, hf_fastmtp kernels tok/s",
    ]
    assert "plain, stock Transformers speedup" not in header and "pld-10 tau" not in header
    assert f"{FM} speedup" in header and f"{FM} tau" in header
    overall = next(line for line in lines if line.startswith("| overall"))
    assert "1.25x" in overall  # ar's speedup over stock: 2.0 / 1.6 s
    assert "1.71x" in overall and "1.86" in overall  # FastMTP speedup 6/3.5 and tau 13/7
    assert "57% / 57%" in text and "29% / 50%" in text  # position 1 and 2, cumulative / conditional
    assert "Speedup: plain, stock Transformers (`ar-stock`)'s total seconds" in text
    assert "NO, 1 of 6 outputs differ from plain, stock Transformers (`ar-stock`)" in text
    assert "question 2 (a, pld-10, from token 1)" in text


def test_plots_for_k_and_vocabulary_sweeps(tmp_path):
    records = []
    for question_id in range(2):
        records.append(record(question_id, "a", STOCK, [1, 2, 3], 1.0))
        for k in (1, 2):
            for vocab, size in (("full", 97), (32, 32), ("auto", 40)):
                entry = record(question_id, "a", f"fastmtp-k{k}-{vocab}", [1, 2, 3], 0.8, stats([2] * k, [1] * k, 2))
                entry["options"] = {"num_draft_tokens": k, "draft_vocab": vocab}
                entry["stats"]["draft_vocab_size"] = size
                records.append(entry)
    results = aggregate(records)
    assert report._vocab_sizes(results) == {32: 32, "auto": 40, "full": 97}
    assert list(report._vocab_sizes(results)) == [32, "auto", "full"]
    written = report.write_plots(results, tmp_path)
    assert sorted(path.name for path in written) == ["acceptance.png", "k_sweep.png", "speedup.png", "vocab_sweep.png"]
    assert all(path.stat().st_size > 0 for path in written)


def test_sweep_lines_keep_confidence_thresholds_apart():
    records = [record(0, "a", STOCK, [1], 1.0)]
    for k, threshold in itertools.product((1, 2), (None, 0.5)):
        options = {"num_draft_tokens": k, "draft_vocab": "full"}
        if threshold is not None:
            options["draft_confidence_threshold"] = threshold
        entry = record(0, "a", f"fastmtp-k{k}-full-{threshold}", [1], 0.5, stats([1] * k, [1] * k, 1))
        entry["options"] = options
        records.append(entry)
    lines = report._sweep(aggregate(records), along="num_draft_tokens")
    assert {name: [k for k, _ in points] for name, points in lines.items()} == {
        "vocab full": [1, 2],
        "vocab full, confidence 0.5": [1, 2],
    }


def test_modes_and_question_selection(tmp_path):
    labels = [mode.label for mode in build_modes(["fastmtp", "pld"], [1, 3], ["full", 8192], pld_tokens=5)]
    assert labels == [STOCK, "fastmtp-k1-full", "fastmtp-k1-8192", "fastmtp-k3-full", "fastmtp-k3-8192", "pld-5"]
    # The reference runs first whatever the order asked for; by default `ar` is the second column.
    assert [mode.label for mode in build_modes(["ar", STOCK], [1])] == [STOCK, "ar"]
    assert [mode.label for mode in build_modes(bench.DEFAULT_METHODS, [1])] == [
        STOCK,
        "ar",
        "fastmtp-k1-full",
        "pld-10",
    ]
    with pytest.raises(BenchError, match="Unknown mode"):
        build_modes(["eagle"], [3])
    gated = build_modes(["fastmtp"], [3], ["auto"], confidence_thresholds=[None, 0.5])
    assert [mode.label for mode in gated] == [STOCK, "fastmtp-k3-auto", "fastmtp-k3-auto-c0.5"]
    assert gated[2].options == {"num_draft_tokens": 3, "draft_vocab": "auto", "draft_confidence_threshold": 0.5}
    lookup = build_modes(["fastmtp"], [3], ["auto"], lookup_tokens=[None, 6])
    assert [mode.label for mode in lookup] == [STOCK, "fastmtp-k3-auto", "fastmtp-k3-auto-lookup6"]
    assert lookup[2].options == {"num_draft_tokens": 3, "draft_vocab": "auto", "prompt_lookup_num_tokens": 6}

    path = write_questions(tmp_path / "q.jsonl", categories=("x", "y"), per_category=3)
    chosen = load_questions(path, per_category=2)
    assert [(q["category"], q["question_id"]) for q in chosen] == [("x", 0), ("y", 1), ("x", 2), ("y", 3)]
    assert chosen[0]["prompt"].startswith("give three tips")  # the first turn
    assert len(load_questions(path)) == 6


def test_questions_from_prompt_files_filtered_and_held_out(tmp_path):
    spec = write_questions(tmp_path / "q.jsonl", categories=("x", "y"), per_category=3)
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"id": f"zh-{i}", "source": "alpaca_zh", "lang": "zh", "prompt": f"问题 {i}"} for i in range(4)]
    prompts.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")

    chosen = load_questions([spec, prompts], per_category=2, categories=["y", "alpaca_zh"], exclude_ids={"zh-0"})
    assert [(q["category"], q["question_id"]) for q in chosen] == [
        ("y", 1),
        ("y", 3),
        ("alpaca_zh", "zh-1"),
        ("alpaca_zh", "zh-2"),
    ]
    assert chosen[-1]["prompt"] == "问题 2"
    with pytest.raises(BenchError, match=r"categories \['z'\]"):
        load_questions(spec, categories=["z"])
    prompts.write_text(json.dumps({"id": "a", "prompt": "no source"}) + "\n", encoding="utf-8")
    assert load_questions(prompts)[0]["category"] == "prompts"  # a file without categories is one: its name
    prompts.write_text(json.dumps({"id": "a", "question": "no prompt"}) + "\n", encoding="utf-8")
    with pytest.raises(BenchError, match="line 1: no prompt column"):
        load_questions(prompts)


def test_cli_options():
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(
        ["bench", "--output", "o", "--k", "1", "2", "--draft-vocab", "full", "8192", "auto", "zh"]
    )
    assert args.func is bench_cli.cmd_bench
    assert args.k == [1, 2] and args.draft_vocab == ["full", 8192, "auto", "zh"]
    assert args.per_category is None and args.pld_tokens == 10 and args.max_new_tokens == 128
    assert args.confidence_threshold == [None] and args.lookup_tokens == [None]
    assert parser.parse_args(["bench", "--output", "o", "--lookup-tokens", "0", "6"]).lookup_tokens == [None, 6]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--output", "o", "--lookup-tokens", "-1"])
    gated = parser.parse_args(["bench", "--output", "o", "--confidence-threshold", "0", "0.6"])
    assert gated.confidence_threshold == [None, 0.6]
    with pytest.raises(SystemExit):
        parser.parse_args(["bench", "--output", "o", "--confidence-threshold", "1.5"])
    with pytest.raises(SystemExit, match="--assistant"):
        bench_cli.cmd_bench(parser.parse_args(["bench", "--output", "o", "--modes", "ar", "assisted"]))


def write_results(folder: Path, accepted: list[int]) -> Path:
    """A bench folder with K=1 and K=2 runs of a head that accepts `accepted` drafts by position (of 2 per cycle)."""
    records = []
    for question_id in range(2):
        records.append(record(question_id, "a", STOCK, [1, 2, 3], 1.0))
        for k in (1, 2):
            entry = record(question_id, "a", f"fastmtp-k{k}-full", [1, 2, 3], 0.5, stats([2] * k, accepted[:k], 2))
            entry["options"] = {"num_draft_tokens": k, "draft_vocab": "full"}
            records.append(entry)
    folder.mkdir()
    results = {"settings": {"head": str(folder), "max_new_tokens": 3}, **aggregate(records)}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


def test_compare_runs(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    strong, weak = write_results(tmp_path / "strong", [2, 1]), write_results(tmp_path / "weak", [1, 0])
    args = parser.parse_args(["compare", "--output", str(tmp_path / "out"), f"strong={strong}", f"weak={weak}"])
    args.func(args)

    table = (tmp_path / "out" / "comparison.md").read_text()
    rows = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    # strong: tau (2 + 2) / 2 at K=1 and (3 + 2) / 2 at K=2; weak: (1 + 2) / 2 at both; speedup 1.0 / 0.5 s.
    assert [cell.strip() for cell in rows["strong"].split("|")[2:-1]] == [
        "2.00",
        "2.00x",
        "2.50",
        "2.00x",
        "100% / 50%",
    ]
    assert [cell.strip() for cell in rows["weak"].split("|")[2:-1]] == ["1.50", "2.00x", "1.50", "2.00x", "50% / 0%"]
    assert "speedups over plain, stock Transformers (`ar-stock`)" in table
    assert (tmp_path / "out" / "comparison.png").stat().st_size > 0
    assert "strong" in capsys.readouterr().out

    with pytest.raises(SystemExit, match="LABEL=DIR"):
        args.func(parser.parse_args(["compare", "--output", "o", str(strong)]))
    with pytest.raises(SystemExit, match="no results.json.*fastmtp bench --output"):
        args.func(parser.parse_args(["compare", "--output", "o", f"missing={tmp_path / 'missing'}"]))


def test_compare_keeps_lookup_and_threshold_modes_on_lines_of_their_own():
    records = [record(0, "a", STOCK, [1], 1.0)]
    for k, extra in itertools.product((1, 2), ({}, {"prompt_lookup_num_tokens": 3})):
        entry = record(0, "a", f"fastmtp-k{k}-{extra}", [1], 0.5, stats([1] * k, [1] * k, 1))
        entry["options"] = {"num_draft_tokens": k, "draft_vocab": "auto", **extra}
        records.append(entry)
    lines = report.fastmtp_lines({"head": aggregate(records)})
    assert {name: [point["num_draft_tokens"] for point in points] for name, points in lines.items()} == {
        "head": [1, 2],
        "head (lookup 3)": [1, 2],
    }


# ---------------------------------------------------------------------------------------------- running

WORDS = "give three tips for staying healthy why is the sky blue write a poem about the sea".split()


def write_questions(path: Path, categories=("writing", "qa"), per_category=2) -> Path:
    prompts = ["give three tips for staying healthy", "why is the sky blue", "write a poem about the sea"]
    rows = [
        {"question_id": i, "category": categories[i % len(categories)], "turns": [prompts[i % 3], "and again"]}
        for i in range(len(categories) * per_category)
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny():
    tokenizer = tiny_tokenizer(WORDS)
    # A head initialised from the base's last layer: unlike a random one, some of its drafts are accepted here.
    return FastMTPForCausalLM.from_base(tiny_base("llama", vocab_size=len(tokenizer))), tokenizer


RUN = {"methods": bench.DEFAULT_METHODS, "num_draft_tokens": [1, 2], "max_new_tokens": 12, "progress": False}
MODES = [STOCK, "ar", "fastmtp-k1-full", "fastmtp-k2-full", "pld-10"]


def read_records(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "records.jsonl").read_text(encoding="utf-8").splitlines()]


def deterministic(results: dict) -> dict:
    """The results without anything measured in seconds."""
    timed = {"seconds", "tokens_per_second", "speedup", "draft_seconds", "verify_seconds", "draft_ms_per_step"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in timed}
        return [strip(v) for v in value] if isinstance(value, list) else value

    return strip({key: results[key] for key in ("modes", "categories", "by_mode", "lossless")})


def test_end_to_end_writes_every_output(tiny, tmp_path):
    model, tokenizer = tiny
    output = tmp_path / "out"
    results = run_bench(model, tokenizer, output, questions=write_questions(tmp_path / "q.jsonl"), **RUN)

    files = {path.name for path in output.iterdir()}
    assert {"settings.json", "records.jsonl", "results.json", "results.md"} <= files
    assert {"speedup.png", "acceptance.png", "k_sweep.png"} <= files
    assert "vocab_sweep.png" not in files  # one vocabulary only

    records = read_records(output)
    assert len(records) == 4 * len(MODES)
    assert all(len(r["new_token_ids"]) == 12 and r["seconds"] > 0 for r in records)
    assert all((r["stats"] is None) == (r["method"] != "fastmtp") for r in records)
    # Rotated: each prompt starts with another mode.
    assert [records[i * len(MODES)]["mode"] for i in range(4)] == MODES[:4]

    assert results["by_mode"]["fastmtp-k2-full"]["overall"]["tau"] > 1  # drafts were accepted
    assert results["lossless"] == {"compared": 16, "mismatches": [], "identical": True}
    assert results["modes"] == MODES and results["categories"] == ["writing", "qa"]
    assert set(results["by_mode"]["fastmtp-k2-full"]["categories"]) == {"writing", "qa"}
    assert json.loads((output / "results.json").read_text()) == json.loads(json.dumps(results))
    text = (output / "results.md").read_text()
    assert "**Lossless**: yes, all 16 outputs are identical to plain, stock Transformers (`ar-stock`)." in text
    assert "| category | plain, stock Transformers tok/s | plain, hf_fastmtp kernels speedup |" in text
    assert "**Hardware**:" in text and "| overall" in text and "k=2" in text
    assert "grouped attention" in results["hardware"]["kernels"]
    # Verification cost, from the calibration: one base forward over n = 1..8 new tokens, chosen and stock kernels.
    assert list(results["forward_ms"]["stock"]) == list(range(1, 9))
    assert all(ms > 0 for ms in results["forward_ms"]["chosen"].values())
    assert "## Verification cost on this hardware" in text and "| ms, stock Transformers |" in text


def test_the_reference_runs_without_the_cpu_kernels(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    entered = kernel_entries(monkeypatch)
    questions = write_questions(tmp_path / "q.jsonl")
    results = run_bench(
        model,
        tokenizer,
        tmp_path / "out",
        questions=questions,
        methods=["ar"],
        max_new_tokens=12,
        progress=False,
    )
    assert results["modes"] == [STOCK, "ar"]
    assert len(entered) == 1 + 4  # `ar` only: its warm-up and one run per prompt
    assert results["lossless"] == {"compared": 4, "mismatches": [], "identical": True}


def test_interrupted_run_resumes(tiny, tmp_path, monkeypatch):
    model, tokenizer = tiny
    output, questions = tmp_path / "out", write_questions(tmp_path / "q.jsonl")
    complete = run_bench(model, tokenizer, output, questions=questions, **RUN)
    lines = (output / "records.jsonl").read_bytes().splitlines(keepends=True)
    # Interrupted while writing record 13 of 20: 12 whole lines and a torn one.
    (output / "records.jsonl").write_bytes(b"".join(lines[:12]) + lines[12][:25])

    calls = []
    original = bench.timed_generate

    def timed_generate(*args, **kwargs):
        calls.append(kwargs["max_new_tokens"])
        return original(*args, **kwargs)

    monkeypatch.setattr(bench, "timed_generate", timed_generate)
    resumed = run_bench(model, tokenizer, output, questions=questions, **RUN)

    # Only the missing records were produced (after a warm-up for each mode they need).
    assert calls.count(RUN["max_new_tokens"]) == 8 and calls.count(bench.WARM_UP_TOKENS) <= len(MODES)
    new_lines = (output / "records.jsonl").read_bytes().splitlines(keepends=True)
    assert new_lines[:12] == lines[:12] and len(new_lines) == 20
    assert {(r["question_id"], r["mode"]) for r in read_records(output)} == {
        (question_id, mode) for question_id in range(4) for mode in MODES
    }
    assert deterministic(resumed) == deterministic(complete)
    assert json.loads((output / "results.json").read_text())["by_mode"][STOCK]["overall"]["prompts"] == 4

    calls.clear()
    run_bench(model, tokenizer, output, questions=questions, **RUN)  # nothing left: only the reports again
    assert not calls


def test_assisted_decoding_with_a_draft_model(tiny, tmp_path):
    model, tokenizer = tiny
    assistant = tiny_base("llama", vocab_size=len(tokenizer), seed=5)
    questions = write_questions(tmp_path / "q.jsonl", per_category=1)
    results = run_bench(
        model,
        tokenizer,
        tmp_path / "out",
        questions=questions,
        **{**RUN, "methods": ["assisted"]},
        assistant_model=assistant,
    )
    assert results["modes"] == [STOCK, "assisted"]
    assert results["lossless"] == {"compared": 2, "mismatches": [], "identical": True}
    assert results["by_mode"]["assisted"]["overall"]["speedup"] > 0


def test_refuses_to_resume_with_other_settings(tiny, tmp_path):
    model, tokenizer = tiny
    output, questions = tmp_path / "out", write_questions(tmp_path / "q.jsonl", per_category=1)
    run_bench(model, tokenizer, output, questions=questions, **{**RUN, "num_draft_tokens": [1]})
    with pytest.raises(BenchError, match="max_new_tokens 12 there, 6 now"):
        run_bench(model, tokenizer, output, questions=questions, **{**RUN, "max_new_tokens": 6})
    with pytest.raises(BenchError, match="model"):
        run_bench(model, tokenizer, output, questions=questions, model_name="another", **RUN)


def saved_for_the_cli(model, tokenizer, folder: Path) -> argparse.ArgumentParser:
    """The tiny model saved as `--base folder/base --head folder/head`, and the `fastmtp` parser."""
    model.save_pretrained(folder / "head")
    model.model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    return parser


def test_cli_loads_the_model_in_the_requested_dtype(tiny, tmp_path):
    model, tokenizer = tiny
    parser = saved_for_the_cli(model, tokenizer, tmp_path)
    argv = ["bench", "--output", "o", "--base", str(tmp_path / "base"), "--head", str(tmp_path / "head")]
    assert (parser.parse_args(argv).dtype, parser.parse_args(argv).device) == ("auto", "auto")
    loaded, _ = load_model(parser.parse_args([*argv, "--dtype", "bfloat16", "--device", "cpu"]))
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    for name, tensor in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[name], tensor.bfloat16())


def test_demo_times_stock_transformers_against_fastmtp(tiny, tmp_path, monkeypatch, capsys):
    """The demo's plain side enters none of this package's kernels: its speedup is over Transformers as it comes."""
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "head")
    model.model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    entered = kernel_entries(monkeypatch)
    argv = ["demo", "--base", str(tmp_path / "base"), "--head", str(tmp_path / "head"), "--max-new-tokens", "8"]
    args = build_parser().parse_args([*argv, "--prompts", "why is the sky blue", "write a poem about the sea"])
    args.func(args)
    assert len(entered) == 1 + 2  # the FastMTP warm-up and runs only
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("Plain decoding in stock Transformers") for line in lines)
    assert "| stock s | stock tok/s | FastMTP s |" in next(line for line in lines if line.startswith("| prompt"))
    assert next(line for line in lines if line.startswith("| overall")).rstrip(" |").endswith("yes")


def test_device_option():
    assert resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(SystemExit, match="--device: .*tpu0"):
        resolve_device("tpu0")
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match="sees no cuda device; use cpu"):
            resolve_device("cuda:0")


def test_commands_gate_drafting_only_when_told():
    def resolved(value):
        return resolve_confidence_threshold(argparse.Namespace(confidence_threshold=value))

    assert resolved(None) is None
    assert resolved(0.0) is None and resolved(0.4) == 0.4
    with pytest.raises(SystemExit, match="between 0 and 1"):
        resolved(1.2)


def test_commands_pass_prompt_lookup_to_fastmtp_only_when_told():
    def parsed(*options):
        return build_parser().parse_args(["generate", "hi", *options])

    assert lookup_kwargs(parsed()) == {}
    assert lookup_kwargs(parsed("--lookup-tokens", "4")) == {"prompt_lookup_num_tokens": 4}
    assert lookup_kwargs(parsed("--lookup-tokens", "0")) == {}
    with pytest.raises(SystemExit):  # refused while parsing, before a model loads
        parsed("--lookup-tokens", "-2")


def test_a_mode_the_model_cannot_run_fails_before_any_record(tiny, tmp_path):
    model, tokenizer = tiny
    output, questions = tmp_path / "out", write_questions(tmp_path / "q.jsonl", per_category=1)
    with pytest.raises(BenchError, match="fastmtp-k1-no-such-vocab cannot run"):
        run_bench(model, tokenizer, output, questions=questions, **{**RUN, "draft_vocabs": ["no-such-vocab"]})
    assert not (output / "records.jsonl").exists()


def test_throughput_by_batch_size_through_the_cli(tiny, tmp_path, capsys):
    """`fastmtp bench --batch-size`: both modes per batch, lossless batch for batch, tables and plot; resumable."""
    model, tokenizer = tiny
    parser = saved_for_the_cli(model, tokenizer, tmp_path)
    questions = write_questions(tmp_path / "q.jsonl", per_category=2)  # 4 prompts of different lengths
    output = tmp_path / "throughput"
    argv = ["bench", "--output", str(output), "--questions", str(questions), "--max-new-tokens", "10"]
    argv += ["--base", str(tmp_path / "base"), "--head", str(tmp_path / "head"), "--k", "2", "--batch-size", "1", "4"]
    args = parser.parse_args(argv)
    args.func(args)

    records = [json.loads(line) for line in (output / "throughput.jsonl").read_text().splitlines()]
    assert sorted((r["batch_size"], r["batch"], r["mode"]) for r in records) == sorted(
        [(1, b, mode) for b in range(4) for mode in ("plain", "fastmtp")] + [(4, 0, "plain"), (4, 0, "fastmtp")]
    )
    assert all(len(r["sequences"]) == r["batch_size"] and r["seconds"] > 0 for r in records)
    results = json.loads((output / "throughput.json").read_text())
    assert set(results["by_batch_size"]) == {"1", "4"}
    for row in results["by_batch_size"].values():
        assert row["identical_batches"] == row["batches"] and row["tau"] >= 1
        assert row["tokens_per_second"]["plain"] > 0 and row["tokens_per_second"]["fastmtp"] > 0
    assert (output / "throughput.png").stat().st_size > 0
    assert "| batch size | batches | plain tok/s | FastMTP tok/s |" in capsys.readouterr().out
    args.func(args)  # a rerun resumes: nothing is run again
    assert len((output / "throughput.jsonl").read_text().splitlines()) == len(records)
