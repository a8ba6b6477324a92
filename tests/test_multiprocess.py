"""
`fastmtp distill` and `fastmtp train` in two CPU processes (torchrun, gloo) give what one process gives, and launches
that ask for several processes but start them apart are refused before any work.

One two-process launch runs every command (starting processes is most of the cost on a CPU), and the one-process
references run here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from accelerate import PartialState
from safetensors.torch import load_file
from test_distill import PROMPTS, REPO_ROOT, tiny_model_and_tokenizer, write_prompts
from test_train import distilled_rows, read_log, write_distilled

from hf_fastmtp.cli import build_parser
from hf_fastmtp.embedded import load_base
from hf_fastmtp.prompts import encode_chat
from hf_fastmtp.training.distill import distill, iter_distilled, load_prompts, read_manifest, select_prompts
from hf_fastmtp.training.processes import check_launch
from hf_fastmtp.training.train import TrainConfig, train

# The same short prompt 8 more times: 16 prompts in batches of 2 leave 8 slots to each of the two processes, so each
# answers a copy, and only dropping duplicates across processes keeps one answer as one process does.
COPIES = [(f"copy-{n}", "alpaca_en", "en", "Why is the sky blue?") for n in range(8)]
DISTILL = ["--batch-size", "2", "--max-new-tokens", "8", "--shard-size", "3", "--temperature", "0"]
TRAIN = ["--batch-size", "2", "--max-steps", "3", "--lr", "1e-2", "--warmup-ratio", "0.25", "--val-fraction", "0.25"]
TRAIN += ["--hidden-dtype", "float32", "--log-every", "1"]
LAUNCH_SCRIPT = """
from hf_fastmtp.cli import main

for command in {commands!r}:
    main(command)
"""


def launch_environment() -> dict[str, str]:
    """One thread per process (the machine may have two cores), gloo on CPUs, and no network."""
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO_ROOT)}
    for name in ("ACCELERATE_USE_CPU", "MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        environment.pop(name, None)
    return environment


def run(command: list[str], cwd: Path, **environment: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        command, cwd=cwd, env={**launch_environment(), **environment}, capture_output=True, text=True, timeout=300
    )


@dataclass
class Setup:
    folder: Path
    base: Path
    prompts: Path
    max_prompt_tokens: int
    too_long: str  # the id of the prompt that is skipped
    train_data: Path


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A saved tiny base, a prompts file with copies of one prompt, and a distilled folder to train on."""
    folder = tmp_path_factory.mktemp("multiprocess")
    model, tokenizer = tiny_model_and_tokenizer()
    torch.manual_seed(0)
    with torch.no_grad():  # larger weights: greedy answers that differ from prompt to prompt, some cut off
        for matrix in (parameter for parameter in model.parameters() if parameter.ndim > 1):
            matrix.normal_(0, 0.5)
    model.save_pretrained(folder / "base")
    tokenizer.save_pretrained(folder / "base")
    prompts = write_prompts(folder / "prompts.jsonl", PROMPTS + COPIES)
    lengths = {id_: len(encode_chat(tokenizer, prompt)["input_ids"][0]) for id_, *_, prompt in PROMPTS}
    longest, *others = sorted(lengths, key=lengths.get, reverse=True)
    assert lengths[longest] > lengths[others[0]]
    max_prompt_tokens = lengths[others[0]]  # the longest prompt is skipped, and counted once, whoever has it
    train_data = write_distilled(folder / "train-data", tokenizer, distilled_rows(tokenizer, 16))
    return Setup(folder, folder / "base", prompts, max_prompt_tokens, longest, train_data)


@pytest.fixture(scope="module")
def two_processes(setup):
    """
    `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`: greedy distill of the first 8 prompts, then of all 16
    (resuming), a sampled distill of all, and a training run.
    """
    folder = setup.folder
    common = ["--base", str(setup.base), "--prompts", str(setup.prompts), "--max-prompt-tokens"]
    common.append(str(setup.max_prompt_tokens))
    commands = [
        ["distill", *common, *DISTILL, "--output", "greedy", "--num-prompts", "8"],
        ["distill", *common, *DISTILL, "--output", "greedy"],
        ["distill", *common, *DISTILL, "--output", "sampled", "--temperature", "1.0"],
        ["train", "--base", str(setup.base), "--data", str(setup.train_data), "--output", "head", *TRAIN],
    ]
    script = folder / "launch.py"
    script.write_text(LAUNCH_SCRIPT.format(commands=commands))
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    result = run(launch, folder, ACCELERATE_USE_CPU="1")
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def one_process_distill(setup, output: Path, **options):
    model, tokenizer, name = load_base(setup.base, "auto")
    settings = {"batch_size": 2, "max_new_tokens": 8, "shard_size": 3, "temperature": 0.0, "progress": False}
    return distill(
        model,
        tokenizer,
        setup.prompts,
        output,
        max_prompt_tokens=setup.max_prompt_tokens,
        model_name=name,
        **{**settings, **options},
    )


def rows_by_id(folder: Path) -> dict[str, dict]:
    rows = list(iter_distilled(folder))
    assert len({row["id"] for row in rows}) == len(rows), "a prompt was answered twice"
    return {row["id"]: row for row in rows}


def duplicates(folder: Path) -> set[tuple[str, str]]:
    path = folder / "duplicates.jsonl"
    return {(row["id"], row["duplicate_of"]) for row in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize(("name", "temperature"), [("greedy", 0.0), ("sampled", 1.0)])
def test_distill_in_two_processes_writes_the_rows_of_one(setup, two_processes, tmp_path, name, temperature):
    reference = one_process_distill(setup, tmp_path / "one", temperature=temperature)
    split = setup.folder / name
    # Each process appended to shards of its own, 3 rows each, and the rows are exactly those of one process: the
    # batches are sampled with their own seeds whichever process answers them.
    shards = sorted(path.name for path in split.glob("shard-*.jsonl"))
    assert {"shard-rank0-00000.jsonl", "shard-rank1-00000.jsonl"} <= set(shards)
    assert all(re.fullmatch(r"shard-rank[01]-\d{5}\.jsonl", shard) for shard in shards)
    assert rows_by_id(split) == rows_by_id(tmp_path / "one")
    manifest = read_manifest(split)
    assert manifest["counts"] == reference.manifest["counts"]
    assert manifest["counts"]["skipped_too_long"] == 1
    assert [run["num_prompts"] for run in manifest["runs"]] == ([8, None] if name == "greedy" else [None])
    if name == "greedy":
        # The copies answered by both processes were dropped as one process drops them, recorded once by the main one.
        assert duplicates(split) == duplicates(tmp_path / "one") != set()
        # One process resumes the folder of two: it finds everything answered.
        resumed = one_process_distill(setup, shutil.copytree(split, tmp_path / "resumed"))
        assert resumed.new_rows == resumed.generated_tokens == 0
        assert resumed.manifest["counts"] == reference.manifest["counts"]


def test_distill_messages_are_printed_once_with_the_counts_of_all_processes(setup, two_processes):
    assert len(re.findall(r"new rows", two_processes.stdout)) == 3
    # The longest prompt is skipped (and said so) once per command that selects it, with the count of all processes.
    first_eight = {prompt["id"] for prompt in select_prompts(load_prompts(setup.prompts), num_prompts=8)}
    expected = (["1"] if setup.too_long in first_eight else []) + ["1", "1"]
    assert re.findall(r"Skipping (\d+) prompts longer than", two_processes.stderr) == expected


def test_train_in_two_processes_equals_one_with_the_same_global_batch(setup, two_processes, tmp_path):
    """Two processes with batches of 2 train the head that one trains with 2 batches of 2 per step."""
    base, tokenizer, name = load_base(setup.base)
    config = TrainConfig(
        output=str(tmp_path / "one"),
        data=str(setup.train_data),
        batch_size=2,
        grad_accum=2,
        max_steps=3,
        lr=1e-2,
        warmup_ratio=0.25,
        val_fraction=0.25,
        hidden_dtype="float32",
        log_every=1,
        progress=False,
    )
    reference = train(base, tokenizer, config, base_model_name_or_path=name)
    assert reference.summary["rows"]["train"] >= 3 * 4  # 3 steps inside one epoch: no batch is repeated
    heads = [load_file(path / "model.safetensors") for path in (setup.folder / "head" / "head", reference.head_dir)]
    assert heads[0].keys() == heads[1].keys()
    for weight in heads[0]:  # the same sums in another order: float32 rounding only
        torch.testing.assert_close(heads[0][weight], heads[1][weight], rtol=1e-4, atol=1e-5, msg=weight)

    logs = [read_log(path) for path in (setup.folder / "head", tmp_path / "one")]
    assert [record["step"] for record in logs[0]] == [record["step"] for record in logs[1]]  # each record once
    for split, one in zip(*logs, strict=True):
        for key in ("loss", "val_loss"):
            if key in one:
                assert split[key] == pytest.approx(one[key], rel=1e-4)
    summary = json.loads((setup.folder / "head" / "training_summary.json").read_text())
    assert summary["hardware"].startswith("2 x CPU")
    assert two_processes.stdout.count("Head saved in") == 1


# ---------------------------------------------------------------------------------------------- refused launches


@pytest.mark.parametrize(
    ("environ", "num_processes", "message"),
    [
        ({}, 1, None),
        ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}, 2, None),
        ({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "localhost"}, 1, "started 2 processes"),
        ({"ACCELERATE_USE_CPU": "False"}, 1, None),  # `accelerate launch` of one process
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}, 1, "asked for several"),
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "PMI_SIZE": "2"}, 2, None),  # under mpirun
        ({"ACCELERATE_USE_CPU": "True", "MASTER_ADDR": "127.0.0.1", "PMI_SIZE": "2"}, 1, "started 2 processes"),
    ],
    ids=["alone", "torchrun", "torchrun-apart", "accelerate-one", "accelerate-cpu-several", "mpirun", "mpirun-apart"],
)
def test_check_launch(environ, num_processes, message):
    if message is None:
        check_launch(num_processes, ValueError, environ)
    else:
        with pytest.raises(ValueError, match=message):
            check_launch(num_processes, ValueError, environ)


def test_commands_refuse_processes_apart_before_loading_a_model(setup, tmp_path, monkeypatch):
    PartialState()  # this process alone, as accelerate sees each process that a launcher leaves apart
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun and `accelerate launch --multi_gpu` set
    for command in (["distill", "--prompts", str(setup.prompts)], ["train", "--data", str(setup.train_data)]):
        args = build_parser().parse_args(
            [*command, "--base", str(tmp_path / "no-model-here"), "--output", str(tmp_path / "out")]
        )
        with pytest.raises(SystemExit, match=f"fastmtp {command[0]}: error: The launcher started 2 processes"):
            args.func(args)
    assert not (tmp_path / "out").exists()


# The check alone, loaded from its file: importing hf_fastmtp (Transformers) is most of a process's start here.
MULTI_GPU = ["--multi_gpu", "--num_processes", "2", "--main_process_port", "0"]
CHECK_SCRIPT = """
import importlib.util

spec = importlib.util.spec_from_file_location("processes", {path!r})
processes = importlib.util.module_from_spec(spec)
spec.loader.exec_module(processes)
state = processes.launched_processes(error=SystemExit)
print(f"process {{state.process_index}} of {{state.num_processes}}", flush=True)
"""


@pytest.mark.parametrize(
    ("launcher", "environment", "expected"),
    [
        (["--cpu", "--num_processes", "2"], {}, "asked for several processes (it set MASTER_ADDR=127.0.0.1)"),
        (MULTI_GPU, {}, "The launcher started 2 processes, but accelerate sees 1"),
        (MULTI_GPU, {"ACCELERATE_USE_CPU": "1"}, None),
    ],
    ids=["cpu", "multi-gpu-without-gpus", "multi-gpu-on-cpus"],
)
def test_accelerate_launches(tmp_path, launcher, environment, expected):
    """The launches of the issue on a machine without GPUs: refused where each process would do everything."""
    script = tmp_path / "check.py"
    script.write_text(CHECK_SCRIPT.format(path=str(REPO_ROOT / "hf_fastmtp" / "training" / "processes.py")))
    result = run([sys.executable, "-m", "accelerate.commands.launch", *launcher, str(script)], tmp_path, **environment)
    if expected:  # (the launcher stops the other process as soon as one fails: it may say it or not)
        assert result.returncode != 0 and "process" not in result.stdout
        assert expected in result.stderr and "ACCELERATE_USE_CPU=1 torchrun" in result.stderr, result.stderr
    else:
        assert result.returncode == 0, result.stderr
        # (both processes write to one pipe: their lines may interleave)
        assert sorted(re.findall(r"process \d+ of \d+", result.stdout)) == ["process 0 of 2", "process 1 of 2"]
