"""Datasets in and out: prompts from JSONL, dataset folders and (cached) Hub ids; distill output as a dataset."""

from __future__ import annotations

import argparse
import configparser
import json
import re
import shutil
from pathlib import Path

import datasets
import huggingface_hub
import pyarrow.parquet
import pytest
import torch
from conftest import tiny_tokenizer
from datasets.packaged_modules.parquet.parquet import Parquet
from test_distill import FAST, PROMPTS, WORDS, tiny_model_and_tokenizer, write_prompts

from hf_fastmtp.bench.metrics import BenchError
from hf_fastmtp.bench.run import DEFAULT_QUESTIONS, load_questions
from hf_fastmtp.cli.bench import register_cli as register_bench
from hf_fastmtp.cli.distill import register_cli as register_distill
from hf_fastmtp.cli.train import register_cli as register_train
from hf_fastmtp.prompt_sources import SourceOptions, read_prompts, with_languages
from hf_fastmtp.training import TrainError
from hf_fastmtp.training.data import load_distilled_examples
from hf_fastmtp.training.distill import (
    DistillError,
    distill,
    iter_distilled,
    load_prompts,
    read_manifest,
    select_prompts,
    selected_prompt_ids,
)
from hf_fastmtp.training.distilled_dataset import export_dataset, push_to_hub
from hf_fastmtp.training.train import TrainConfig

torch.set_num_threads(1)
REPO_ROOT = Path(__file__).resolve().parent.parent
CHATS = [
    {"conversation_id": 7, "chat": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]}
    for text in ("Why is the sky blue?", "Describe an atom.", "天空 为什么 是 蓝色 的")
]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch) -> Path:
    """A datasets cache of each test's own: none is written in the user's, and no test reads another's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache" / "datasets"))
    return tmp_path / "cache" / "datasets"


@pytest.fixture
def offline_caches(tmp_path, monkeypatch) -> Path:
    """`HF_HUB_OFFLINE=1` with empty datasets and Hub caches under tmp_path (set where the libraries read them)."""
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache" / "hub"))
    return tmp_path / "cache"


def cache_hub_dataset(
    caches: Path, repo_id: str, parquet_files: list[Path], extra_files: dict[str, Path] | None = None
):
    """
    Lays out what `load_dataset(repo_id)` leaves in the datasets cache (and `hf_hub_download` in the Hub cache), so
    that it loads offline: prepared with the Parquet builder, then moved where a Hub dataset's preparation goes.
    """
    builder = Parquet(
        cache_dir=str(caches / "build"),
        dataset_name=repo_id.split("/")[1],
        data_files={"train": [str(path) for path in parquet_files]},
    )
    builder.download_and_prepare()
    namespace, name = repo_id.split("/")
    shutil.copytree(
        builder.cache_dir, caches / "datasets" / f"{namespace}___{name}" / "default" / "0.0.0" / ("0" * 16)
    )
    repo = caches / "hub" / f"datasets--{namespace}--{name}"
    for filename, path in (extra_files or {}).items():
        (repo / "snapshots" / ("a" * 40)).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, repo / "snapshots" / ("a" * 40) / filename)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text("a" * 40)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------- datasets in


def test_jsonl_columns_turns_and_messages(tmp_path):
    custom = write_jsonl(tmp_path / "custom.jsonl", [{"uid": 3, "q": "Why is the sky blue?"}, {"uid": 4, "q": "Hi"}])
    rows = with_languages(read_prompts(custom, SourceOptions(prompt_column="q", id_column="uid")))
    assert [(r["id"], r["source"], r["prompt"]) for r in rows] == [
        (3, "custom", "Why is the sky blue?"),
        (4, "custom", "Hi"),
    ]
    assert rows[0]["lang"] == "en" and rows[1]["lang"] == "und"  # "Hi" is too short to tell
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": chat["chat"]} for chat in CHATS])
    assert [r["prompt"] for r in read_prompts(chats)] == [chat["chat"][1]["content"] for chat in CHATS]
    assert [r["id"] for r in read_prompts(chats)] == ["chats-0", "chats-1", "chats-2"]  # no id column: the index
    # The distillation format is read as before, and its lang column is kept.
    assert load_prompts(write_prompts(tmp_path / "p.jsonl")) == [
        {"id": i, "source": s, "lang": lang, "prompt": p} for i, s, lang, p in PROMPTS
    ]


def test_local_dataset_folders_and_files(tmp_path):
    train = datasets.Dataset.from_list([{"conversation_id": i, "chat": chat["chat"]} for i, chat in enumerate(CHATS)])
    test = datasets.Dataset.from_list([{"conversation_id": 9, "chat": CHATS[0]["chat"]}])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(tmp_path / "saved")
    options = SourceOptions(messages_column="chat", id_column="conversation_id")
    rows = load_prompts(tmp_path / "saved", options)  # several splits: train
    assert [(r["id"], r["source"], r["lang"]) for r in rows] == [
        ("0", "saved", None),
        ("1", "saved", None),
        ("2", "saved", None),
    ]
    # No lang column: languages are detected where they are needed, for a --lang filter or for the chosen prompts.
    assert select_prompts(rows, langs=["zh"]) == [{**rows[2], "lang": "zh"}]
    assert {r["lang"] for r in select_prompts(rows, num_prompts=3)} == {"en", "zh"}
    assert [
        r["id"] for r in load_prompts(tmp_path / "saved", SourceOptions(**{**options.to_dict(), "split": "test"}))
    ] == ["9"]
    with pytest.raises(DistillError, match="no split 'dev'; it has train, test"):
        load_prompts(tmp_path / "saved", SourceOptions(split="dev", messages_column="chat"))

    (tmp_path / "folder" / "data").mkdir(parents=True)
    train.to_parquet(tmp_path / "folder" / "data" / "train-00000.parquet")
    assert [r["prompt"] for r in load_prompts(tmp_path / "folder", options)] == [r["prompt"] for r in rows]
    train.to_parquet(tmp_path / "one.parquet")
    assert load_prompts(tmp_path / "one.parquet", options) == [{**r, "source": "one"} for r in rows]


def test_hub_id_from_the_offline_cache(tmp_path, offline_caches):
    prompts = datasets.Dataset.from_list(
        [{"id": f"q{i}", "prompt": p, "category": "qa"} for i, (*_, p) in enumerate(PROMPTS)]
    )
    prompts.to_parquet(tmp_path / "train.parquet")
    cache_hub_dataset(offline_caches, "someone/prompts", [tmp_path / "train.parquet"])
    questions = load_questions("someone/prompts", per_category=3)
    assert [(q["question_id"], q["category"]) for q in questions] == [("q0", "qa"), ("q1", "qa"), ("q2", "qa")]
    with pytest.raises(
        BenchError,
        match="someone/missing: no such local file or folder, the Hub cannot be reached .* not in the datasets cache",
    ):
        load_questions("someone/missing")


@pytest.mark.parametrize(
    "rows, options, message",
    [
        ([{"text": "hi"}], SourceOptions(prompt_column="prompt"), "has no column 'prompt'; its columns are 'text'"),
        ([{"text": "hi"}], SourceOptions(), "bad has no prompt column among .text.*--prompt-column"),
        (
            [{"chat": [{"role": "assistant", "content": "x"}]}],
            SourceOptions(messages_column="chat"),
            "not chat messages",
        ),
        (
            [{"prompt": "a", "id": 1}, {"prompt": "b", "id": 1}],
            SourceOptions(),
            "row 1: id 1 is already used on row 0",
        ),
        ([{"prompt": "a"}], SourceOptions(prompt_column="prompt", messages_column="chat"), "not both"),
    ],
)
def test_bad_datasets(tmp_path, rows, options, message):
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "bad")
    with pytest.raises(DistillError, match=message):
        load_prompts(tmp_path / "bad", options)


def test_empty_and_missing_sources(tmp_path):
    datasets.Dataset.from_dict({"prompt": ["x"]}).filter(lambda row: False).save_to_disk(tmp_path / "empty")
    with pytest.raises(DistillError, match="empty is empty"):
        load_prompts(tmp_path / "empty")
    with pytest.raises(BenchError, match="Questions file nowhere.parquet not found"):
        load_questions("nowhere.parquet")
    with pytest.raises(BenchError, match="not found: give a JSONL file, a dataset folder"):
        load_questions(str(tmp_path / "no" / "such" / "folder"))


def test_bench_default_questions_ship_with_the_package(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    register_bench(parser.add_subparsers())
    args = parser.parse_args(["bench", "--output", "out"])
    questions = load_questions(args.questions)
    assert len(questions) == 480 and len({q["category"] for q in questions}) == 13
    assert DEFAULT_QUESTIONS.is_relative_to(REPO_ROOT / "hf_fastmtp")
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    assert "data/*" in setup["options.package_data"]["hf_fastmtp"].split()
    assert "datasets" in setup["options"]["install_requires"]


# ---------------------------------------------------------------------------------------------- datasets out


@pytest.fixture(scope="module")
def distilled(tiny, tmp_path_factory) -> Path:
    """A distill run on chat prompts from a dataset folder (the rows are in the distillation format's order)."""
    model, tokenizer = tiny
    folder = tmp_path_factory.mktemp("distilled")
    rows = [
        {"uid": i, "source": s, "chat": [{"role": "user", "content": p}]} for i, (_, s, _, p) in enumerate(PROMPTS)
    ]
    datasets.Dataset.from_list(rows).save_to_disk(folder / "prompts")
    options = SourceOptions(messages_column="chat", id_column="uid")
    distill(model, tokenizer, folder / "prompts", folder / "out", prompt_options=options, model_name="tiny", **FAST)
    export_dataset(folder / "out")
    return folder / "out"


def test_distill_output_loads_with_datasets(tiny, distilled, tmp_path):
    loaded = datasets.load_dataset(str(distilled), split="train")
    assert loaded.to_list() == list(iter_distilled(distilled))
    # More rows (another run, other prompts) are in the next load, not a stale cache.
    more = tmp_path / "more"
    shutil.copytree(distilled, more)
    distill(
        *tiny,
        write_prompts(tmp_path / "more.jsonl", [("x-0", "x", "en", "Describe an atom.")]),
        more,
        model_name="tiny",
        **FAST,
    )
    export_dataset(more)
    assert datasets.load_dataset(str(more), split="train").to_list() == list(iter_distilled(more))
    assert len(list(iter_distilled(more))) == len(loaded) + 1
    assert loaded.features["response_ids"].feature.dtype == "int32"
    manifest = read_manifest(distilled)
    assert manifest["runs"][0]["prompt_options"] == {"messages_column": "chat", "id_column": "uid"}
    assert selected_prompt_ids(distilled) == {str(i) for i in range(len(PROMPTS))}  # the dataset is read again
    card = huggingface_hub.DatasetCard.load(distilled / "README.md")
    assert card.data.base_model == "tiny" and card.data.license == "other"  # mixed: CC BY-NC and MIT
    assert card.data.fastmtp["sampling"] == {"temperature": 1.0, "top_k": 20, "top_p": 0.95, "max_new_tokens": 8}
    assert card.data.fastmtp["tokenizer"] == manifest["tokenizer"]
    assert "| alpaca_zh | 2 | zh 2 | cc-by-nc-4.0 |" in card.text  # languages detected: the data had no lang column
    assert re.search(r"\| gsm8k_train \| 1 \| \w+ 1 \| mit \|", card.text)
    assert f"`{distilled.parent / 'prompts'}` (id_column=uid, messages_column=chat)" in card.text


def test_a_folder_without_its_log_resumes_from_its_parquet_files(tiny, distilled, tmp_path):
    """What a clone of committed data holds (manifest, card, Parquet files): distill restores the log and goes on."""
    clone = tmp_path / "clone"
    shutil.copytree(distilled, clone, ignore=shutil.ignore_patterns("shard-*.jsonl"))
    assert (
        pyarrow.parquet.ParquetFile(next(clone.glob("data/*.parquet"))).metadata.row_group(0).column(0).compression
        == "ZSTD"
    )
    more = write_prompts(tmp_path / "more.jsonl", [("x-0", "x", "en", "Describe an atom.")])
    result = distill(*tiny, more, clone, model_name="tiny", **FAST)
    assert result.new_rows == 1  # the restored rows are not answered again
    rows = list(iter_distilled(clone))
    assert rows[:-1] == list(iter_distilled(distilled)) and rows[-1]["id"] == "x-0"
    export_dataset(clone)
    assert datasets.load_dataset(str(clone), split="train").to_list() == rows


def test_train_reads_folder_parquet_and_hub_id(tiny, distilled, tmp_path, offline_caches):
    _, tokenizer = tiny
    expected, report = load_distilled_examples(distilled, tokenizer, max_seq_len=64)
    assert report.manifest == read_manifest(distilled)
    shutil.copytree(distilled / "data", tmp_path / "parquet" / "data")
    shutil.copy(distilled / "manifest.json", tmp_path / "parquet")
    assert load_distilled_examples(tmp_path / "parquet", tokenizer, max_seq_len=64)[0] == expected
    cache_hub_dataset(
        offline_caches,
        "someone/distilled",
        sorted((distilled / "data").glob("*.parquet")),
        {"manifest.json": distilled / "manifest.json"},
    )
    TrainConfig(output=str(tmp_path / "run"), data="someone/distilled").check()
    examples, report = load_distilled_examples("someone/distilled", tokenizer, max_seq_len=64)
    assert examples == expected and report.manifest["model"] == "tiny"
    with pytest.raises(TrainError, match="made with another tokenizer"):
        load_distilled_examples("someone/distilled", tiny_tokenizer([*WORDS, "extra"]), max_seq_len=64)
    with pytest.raises(TrainError, match="has no prompt_ids or response_ids column"):
        load_distilled_examples(distilled.parent / "prompts", tokenizer, max_seq_len=64)


def test_cli_trains_on_a_hub_dataset(tiny, distilled, tmp_path, offline_caches, capsys):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    files = sorted((distilled / "data").glob("*.parquet"))
    cache_hub_dataset(offline_caches, "someone/distilled", files, {"manifest.json": distilled / "manifest.json"})
    parser = argparse.ArgumentParser()
    register_train(parser.add_subparsers())
    argv = [
        "train",
        "--data",
        "someone/distilled",
        "--output",
        str(tmp_path / "run"),
        "--base",
        str(tmp_path / "base"),
    ]
    args = parser.parse_args([*argv, "--max-steps", "1", "--batch-size", "2", "-k", "2", "--val-fraction", "0"])
    args.func(args)
    assert "Head saved in" in capsys.readouterr().out
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text(encoding="utf-8"))
    assert summary["distilled_by"] == {"model": "tiny", "sampling": read_manifest(distilled)["sampling"]}


class FakeHfApi:
    """Records the calls, and 'uploads' what the allow patterns select into a local folder."""

    calls: list[tuple[str, dict]] = []
    remote: Path

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/datasets/{repo_id}"

    def upload_folder(self, *, folder_path, allow_patterns, **kwargs):
        self.calls.append(("upload_folder", {"allow_patterns": allow_patterns, **kwargs}))
        for pattern in allow_patterns:
            for path in Path(folder_path).glob(pattern):
                (self.remote / path.relative_to(folder_path)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(path, self.remote / path.relative_to(folder_path))


def test_push_to_hub_uploads_a_loadable_dataset(distilled, tmp_path, monkeypatch):
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "remote", tmp_path / "remote", raising=False)
    url = push_to_hub(distilled, "someone/distilled", private=True)
    assert url == "https://huggingface.co/datasets/someone/distilled"
    (create, create_kwargs), (upload, upload_kwargs) = FakeHfApi.calls
    assert create_kwargs == {"repo_id": "someone/distilled", "repo_type": "dataset", "private": True, "exist_ok": True}
    assert upload_kwargs["repo_type"] == "dataset" and upload_kwargs["repo_id"] == "someone/distilled"
    uploaded = sorted(str(path.relative_to(tmp_path / "remote")) for path in (tmp_path / "remote").rglob("*"))
    assert uploaded == ["README.md", "data", "data/shard-00000.parquet", "manifest.json"]  # no JSONL log
    assert datasets.load_dataset(str(tmp_path / "remote"), split="train").to_list() == list(iter_distilled(distilled))
    card = huggingface_hub.DatasetCard.load(tmp_path / "remote" / "README.md")
    assert 'load_dataset("someone/distilled", split="train")' in card.text
    assert (card.data.license, card.data.license_name) == ("other", "mixed-see-prompt-sources")


def test_cli_dataset_prompts_and_push(tiny, tmp_path, monkeypatch, capsys):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    datasets.Dataset.from_list(CHATS).to_parquet(tmp_path / "chats.parquet")
    parser = argparse.ArgumentParser()
    register_distill(parser.add_subparsers())
    argv = ["distill", "--base", str(tmp_path / "base"), "--output", str(tmp_path / "out"), "--max-new-tokens", "4"]
    with pytest.raises(SystemExit, match="needs prompts: pass --prompts with a JSONL file"):
        args = parser.parse_args(argv)
        args.func(args)
    with pytest.raises(SystemExit, match="has no column 'messages'; its columns are 'conversation_id', 'chat'"):
        args = parser.parse_args(
            [*argv, "--prompts", str(tmp_path / "chats.parquet"), "--messages-column", "messages"]
        )
        args.base = str(tmp_path / "no-model-here")  # the prompts are read before the model loads
        args.func(args)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHfApi)
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "remote", tmp_path / "remote", raising=False)
    argv += ["--prompts", str(tmp_path / "chats.parquet"), "--messages-column", "chat", "--push-to-hub", "me/data"]
    args = parser.parse_args(argv)
    args.func(args)
    assert "Uploaded to https://huggingface.co/datasets/me/data" in capsys.readouterr().out
    rows = datasets.load_dataset(str(tmp_path / "remote"), split="train")
    assert sorted(rows["id"]) == ["chats-0", "chats-1", "chats-2"] and set(rows["source"]) == {"chats"}
