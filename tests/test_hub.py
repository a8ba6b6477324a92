"""MiMo checkpoints (TencentBAC/FastMTP), head repos on the Hub and in its cache, remote code, SGLang export."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_fastmtp
from huggingface_hub import RepoUrl
from safetensors.torch import load_file, save_file
from transformers import Qwen2ForCausalLM

from hf_fastmtp import FastMTPForCausalLM, HeadMismatchError
from hf_fastmtp.checkpoints import draft_vocab_map_paths, export_sglang
from hf_fastmtp.cli.export import register_cli
from hf_fastmtp.decoding.mimo import CheckpointError
from hf_fastmtp.decoding.model_card import model_card

REPO_ID = "TencentBAC/FastMTP"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
VOCAB_MAP = "fr_zh/freq_zh_50.pt"


pytestmark = pytest.mark.usefixtures("one_thread")


def write_mimo_checkpoint(
    folder: Path,
    model: FastMTPForCausalLM,
    *,
    num_nextn_predict_layers: int = 1,
    head: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """
    Writes `model` as MiMo ships it: base and `model.mtp_layers.0.*` in two bf16 shards with an index, a config with
    MiMo's (pre-v5) fields, a second MTP layer FastMTP ignores, and a vocabulary map. Returns the tensors written.
    """
    if head is None:
        head = {
            f"model.mtp_layers.{layer}.{name}": tensor
            for layer in (0, 1)
            for name, tensor in model.head.state_dict().items()
        }
    state = {
        name: tensor.to(torch.bfloat16).contiguous() for name, tensor in {**model.model.state_dict(), **head}.items()
    }
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    folder.mkdir(parents=True)
    weight_map = {}
    for shard, shard_names in shards.items():
        save_file({name: state[name] for name in shard_names}, folder / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard_names, shard))
    index = {
        "metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
        "weight_map": weight_map,
    }
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {
        k: v for k, v in model.model.config.to_dict().items() if k not in ("dtype", "rope_parameters", "layer_types")
    }
    config.update(
        model_type="mimo",
        architectures=["MiMoForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_mimo.MiMoConfig",
            "AutoModelForCausalLM": "modeling_mimo.MiMoForCausalLM",
        },
        num_nextn_predict_layers=num_nextn_predict_layers,
        torch_dtype="bfloat16",
        rope_theta=10000.0,
        rope_scaling=None,
    )
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "fr_zh").mkdir()
    torch.save(torch.arange(50, dtype=torch.int32), folder / VOCAB_MAP)
    return state


def lay_out_hub_cache(cache: Path, repo_id: str, checkpoint: Path) -> Path:
    """
    The Hugging Face cache as a download leaves it: the files as blobs, a snapshot of symlinks to them per commit,
    and `refs/main` naming the commit.
    """
    repo_folder = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / COMMIT
    for file in sorted(checkpoint.rglob("*")):
        if file.is_file():
            blob = repo_folder / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
            blob.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, blob)
            link = snapshot / file.relative_to(checkpoint)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(os.path.relpath(blob, link.parent))
    (repo_folder / "refs").mkdir()
    (repo_folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def mimo(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    source = tiny_fastmtp("qwen2")
    folder = tmp_path / "mimo"
    return folder, write_mimo_checkpoint(folder, source)


def assert_head_is_checkpoint_layer_0(model: FastMTPForCausalLM, tensors: dict[str, torch.Tensor]) -> None:
    head = model.head.state_dict()
    assert set(head) == {
        name.removeprefix("model.mtp_layers.0.") for name in tensors if name.startswith("model.mtp_layers.0.")
    }
    for name, tensor in head.items():
        assert torch.equal(tensor, tensors["model.mtp_layers.0." + name].to(tensor.dtype)), name


def assert_lossless(model: FastMTPForCausalLM) -> None:
    input_ids = torch.randint(1, 97, (1, 7), generator=torch.Generator().manual_seed(0))
    plain = model.generate(input_ids, do_sample=False, max_new_tokens=20, fastmtp=False)
    fast = model.generate(input_ids, do_sample=False, max_new_tokens=20, fastmtp=True)
    assert torch.equal(fast, plain)
    assert model.last_fastmtp_stats.cycles > 0


# ----------------------------------------------------------------------------- MiMo checkpoints


def test_load_mimo_from_a_folder_keeps_bf16(mimo):
    folder, tensors = mimo
    model = FastMTPForCausalLM.from_pretrained(folder)
    assert type(model.model) is Qwen2ForCausalLM
    assert model.model.dtype == model.head.input_proj.weight.dtype == torch.bfloat16
    assert_head_is_checkpoint_layer_0(model, tensors)  # and model.mtp_layers.1 ignored
    for name, tensor in model.model.state_dict().items():
        assert torch.equal(tensor, tensors[name]), name
    assert model.config.base_model_name_or_path == str(folder)
    assert model.config.draft_vocab_maps == {"zh": str(folder / VOCAB_MAP)}
    assert draft_vocab_map_paths(model.config) == {"zh": folder / VOCAB_MAP}


def test_load_mimo_greedy_fastmtp_equals_plain_greedy(mimo):
    folder, tensors = mimo
    model = FastMTPForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert model.dtype == torch.float32
    assert_head_is_checkpoint_layer_0(model, tensors)
    assert_lossless(model)


def test_load_mimo_by_repo_id_from_an_offline_cache(mimo, offline_hub, tmp_path):
    folder, tensors = mimo
    snapshot = lay_out_hub_cache(offline_hub, REPO_ID, folder)
    assert huggingface_hub.hf_hub_download(REPO_ID, "config.json") == str(snapshot / "config.json")

    model = FastMTPForCausalLM.from_pretrained(REPO_ID, dtype=torch.float32)
    assert_head_is_checkpoint_layer_0(model, tensors)
    assert model.config.base_model_name_or_path == REPO_ID
    assert model.config.draft_vocab_maps == {"zh": str(snapshot / VOCAB_MAP)}
    assert_lossless(model)

    pinned = FastMTPForCausalLM.from_pretrained(REPO_ID, revision=COMMIT)
    assert pinned.config.base_model_revision == COMMIT and pinned.dtype == torch.bfloat16

    model.save_pretrained(tmp_path / "head")  # the map is copied under its own name, not its blob's
    assert json.loads((tmp_path / "head" / "config.json").read_text())["draft_vocab_maps"] == {
        "zh": "vocab/freq_zh_50.pt"
    }
    assert torch.load(tmp_path / "head" / "vocab" / "freq_zh_50.pt").tolist() == list(range(50))


def test_extra_vocab_maps_from_files_and_repos(mimo, offline_hub, tmp_path):
    folder, _ = mimo
    snapshot = lay_out_hub_cache(offline_hub, REPO_ID, folder)
    english = tmp_path / "freq_en_40.pt"
    torch.save(torch.arange(40), english)
    model = FastMTPForCausalLM.from_pretrained(
        folder, draft_vocab_maps={"en": str(english), "xx": f"{REPO_ID}:{VOCAB_MAP}"}
    )
    assert model.config.draft_vocab_maps == {
        "zh": str(folder / VOCAB_MAP),
        "en": str(english),
        "xx": str(snapshot / VOCAB_MAP),
    }
    with pytest.raises(FileNotFoundError, match="neither a local file nor 'repo_id:filename'"):
        FastMTPForCausalLM.from_pretrained(folder, draft_vocab_maps={"en": str(tmp_path / "nowhere.pt")})


def test_mimo_export_load_round_trip_is_exact(mimo, tmp_path):
    folder, tensors = mimo
    model = FastMTPForCausalLM.from_pretrained(folder)
    command = export_sglang(model, tmp_path / "sglang")

    exported = tmp_path / "sglang"
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "mimo" and config["architectures"] == ["MiMoForCausalLM"]
    assert config["num_nextn_predict_layers"] == 1 and config["torch_dtype"] == "bfloat16"
    assert config["auto_map"] == {"AutoConfig": "configuration_mimo.MiMoConfig"}
    assert (exported / "configuration_mimo.py").is_file()
    assert torch.load(exported / "freq_zh_50.pt").tolist() == list(range(50))
    assert command == (
        f"python -m sglang.launch_server --model-path {exported} --speculative-algorithm EAGLE "
        "--speculative-num-steps 3 --speculative-eagle-topk 1 --speculative-num-draft-tokens 4 "
        f"--speculative-token-map {exported / 'freq_zh_50.pt'} --trust-remote-code"
    )
    index = json.loads((exported / "model.safetensors.index.json").read_text())["weight_map"]
    written = {name: tensor for shard in set(index.values()) for name, tensor in load_file(exported / shard).items()}
    assert set(written) == set(index) == {name for name in tensors if not name.startswith("model.mtp_layers.1.")}
    for name, tensor in written.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, tensors[name]), name

    reloaded = FastMTPForCausalLM.from_pretrained(exported)
    original, again = model.state_dict(), reloaded.state_dict()
    assert set(original) == set(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name


def test_exported_config_loads_with_remote_code(mimo, tmp_path):
    """SGLang reads the exported config through Transformers' remote code (`configuration_mimo.py`)."""
    folder, _ = mimo
    export_sglang(FastMTPForCausalLM.from_pretrained(folder), tmp_path / "sglang")
    script = (
        "from transformers import AutoConfig; "
        f"config = AutoConfig.from_pretrained({str(tmp_path / 'sglang')!r}, trust_remote_code=True); "
        "print(config.model_type, config.num_nextn_predict_layers, config.rope_parameters['rope_theta'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["mimo", "1", "10000.0"]


def test_export_cli(mimo, tmp_path, capsys):
    folder, _ = mimo
    parser = argparse.ArgumentParser(prog="fastmtp")
    register_cli(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["export", "--format", "sglang", "--head", str(folder), "--output", str(tmp_path / "out")]
    )
    args.func(args)
    assert "--speculative-num-draft-tokens 4" in capsys.readouterr().out
    assert (tmp_path / "out" / "config.json").is_file()
    with pytest.raises(SystemExit, match="not empty"):
        args.func(args)


def test_export_refuses_bases_sglang_cannot_serve(tmp_path):
    with pytest.raises(ValueError, match="Qwen2-architecture bases only.*'llama'"):
        export_sglang(tiny_fastmtp("llama"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_head_saved_from_a_mimo_model_loads_its_qwen2_base(mimo, tmp_path):
    folder, tensors = mimo
    FastMTPForCausalLM.from_pretrained(folder).save_pretrained(tmp_path / "head")
    config = json.loads((tmp_path / "head" / "config.json").read_text())
    assert config["base_model_name_or_path"] == str(folder)
    assert config["draft_vocab_maps"] == {"zh": "vocab/freq_zh_50.pt"}
    reloaded = FastMTPForCausalLM.from_pretrained(tmp_path / "head")
    assert type(reloaded.model) is Qwen2ForCausalLM
    assert_head_is_checkpoint_layer_0(reloaded, tensors)
    assert reloaded.config.draft_vocab_maps == {"zh": str(tmp_path / "head" / "vocab" / "freq_zh_50.pt")}


# ----------------------------------------------------------------------------- bad checkpoints


def test_mimo_without_mtp_weights(tmp_path):
    write_mimo_checkpoint(tmp_path / "mimo", tiny_fastmtp("qwen2"), head={})
    with pytest.raises(ValueError, match=r"no `model\.mtp_layers\.0\.\*` tensors"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "mimo")


def test_mimo_with_zero_mtp_layers(tmp_path):
    write_mimo_checkpoint(tmp_path / "mimo", tiny_fastmtp("qwen2"), num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="without MTP layers.*num_nextn_predict_layers"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "mimo")


def test_mimo_with_wrong_head_shapes(tmp_path):
    model = tiny_fastmtp("qwen2")
    head = {f"model.mtp_layers.0.{name}": tensor for name, tensor in model.head.state_dict().items()}
    head["model.mtp_layers.0.input_proj.weight"] = torch.zeros(32, 48)
    write_mimo_checkpoint(tmp_path / "mimo", model, head=head)
    with pytest.raises(HeadMismatchError, match=r"wrong shapes.*input_proj\.weight: checkpoint \(32, 48\)"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "mimo")


def test_mimo_with_a_truncated_shard(mimo):
    folder, _ = mimo
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is corrupt or truncated"):
        FastMTPForCausalLM.from_pretrained(folder)


def test_mimo_with_a_missing_shard(mimo):
    folder, _ = mimo
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00001-of-00002.safetensors, listed in .* is missing"):
        FastMTPForCausalLM.from_pretrained(folder)


def test_mimo_with_missing_base_weights(tmp_path):
    model = tiny_fastmtp("qwen2")
    write_mimo_checkpoint(tmp_path / "mimo", model)
    index_file = tmp_path / "mimo" / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = tmp_path / "mimo" / index["weight_map"].pop("lm_head.weight")
    kept = {name: tensor for name, tensor in load_file(shard).items() if name != "lm_head.weight"}
    save_file(kept, shard, metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="lacks 1 base weights \\(lm_head.weight\\)"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "mimo")


def test_head_config_without_a_base(tmp_path):
    model = tiny_fastmtp("llama")
    model.config.base_model_name_or_path = None
    model.save_pretrained(tmp_path / "head")
    with pytest.raises(ValueError, match="does not name its base model.*pass `base_model=`"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "head")


# ----------------------------------------------------------------------------- head-only repos


def saved_head(tmp_path: Path) -> tuple[FastMTPForCausalLM, Path]:
    """A tiny Llama base in a local folder and a head that names it, with an English vocabulary map."""
    model = tiny_fastmtp("llama")
    model.model.save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    torch.save(torch.arange(60), tmp_path / "freq_en_60.pt")
    model.set_draft_vocab_maps({"en": torch.load(tmp_path / "freq_en_60.pt")})
    model.save_pretrained(tmp_path / "head")
    return model, tmp_path / "head"


def subprocess_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_MODULES_CACHE": str(tmp_path / "modules"),
        "HF_FASTMTP_CACHE": str(tmp_path / "hf_fastmtp"),  # (calibrations measured in the subprocess)
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": "",
    }


# A subprocess in which `import hf_fastmtp` fails: what the Hub's remote code must work without.
WITHOUT_HF_FASTMTP = """
import importlib.abc, json, sys

class HideHfFastmtp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "hf_fastmtp":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, HideHfFastmtp())
try:
    import hf_fastmtp
    raise SystemExit("hf_fastmtp is importable")
except ModuleNotFoundError:
    pass

import torch
from transformers import AutoModelForCausalLM

torch.set_num_threads(1)
"""

REMOTE_CODE_SCRIPT = (
    WITHOUT_HF_FASTMTP
    + """
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
input_ids = torch.tensor([[5, 17, 3, 42, 8]])
plain = model.generate(input_ids, do_sample=False, max_new_tokens=15, fastmtp=False)
fast = model.generate(input_ids, do_sample=False, max_new_tokens=15, fastmtp=True)
print(json.dumps({
    "module": type(model).__module__,
    "plain": plain.tolist(),
    "fast": fast.tolist(),
    "cycles": model.last_fastmtp_stats.cycles,
    "vocab_maps": model.config.draft_vocab_maps,
    "loaded": sorted(name for name in sys.modules if name.startswith("hf_fastmtp")),
}))
"""
)


def run_remote_code(head: Path, tmp_path: Path) -> dict:
    """`REMOTE_CODE_SCRIPT`'s report on `head`, run where hf_fastmtp cannot be imported."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(REMOTE_CODE_SCRIPT), str(head)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=subprocess_env(tmp_path),
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_head_folder_loads_and_generates_without_hf_fastmtp(tmp_path):
    model, head = saved_head(tmp_path)
    files = {path.name for path in head.iterdir()}
    remote_code = {
        "modeling_fastmtp.py",
        "configuration_fastmtp.py",
        "mtp_head.py",
        "candidate_generator.py",
        "speculative_decoding.py",
        "transformers_compat.py",
    }
    modules = {"draft_vocab.py", "cpu_kernels.py", "calibration.py", "draft_weights.py", "draft_length.py"}
    assert remote_code | modules <= files
    assert {"hub_files.py", "mimo.py", "model_card.py"} <= files
    assert not files & {"checkpoints.py", "export.py", "run.py", "train.py"}  # nothing beyond decoding/
    config = json.loads((head / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_fastmtp.FastMTPConfig",
        "AutoModelForCausalLM": "modeling_fastmtp.FastMTPForCausalLM",
    }
    assert config["draft_vocab_maps"] == {"en": "vocab/freq_en_60.pt"}
    assert torch.load(head / "vocab" / "freq_en_60.pt").tolist() == list(range(60))

    report = run_remote_code(head, tmp_path)
    assert report["module"].startswith("transformers_modules.")
    assert report["loaded"] == []
    assert report["cycles"] > 0
    assert report["fast"] == report["plain"]
    assert (
        report["plain"]
        == model.generate(torch.tensor([[5, 17, 3, 42, 8]]), do_sample=False, max_new_tokens=15).tolist()
    )
    assert report["vocab_maps"] == {"en": str(head / "vocab" / "freq_en_60.pt")}


def test_head_repo_by_id_from_an_offline_cache(tmp_path, offline_hub):
    model, head = saved_head(tmp_path)
    snapshot = lay_out_hub_cache(offline_hub, "me/tiny-head", head)
    loaded = FastMTPForCausalLM.from_pretrained("me/tiny-head")
    for name, tensor in model.head.state_dict().items():
        assert torch.equal(loaded.head.state_dict()[name], tensor), name
    assert loaded.config.draft_vocab_maps == {"en": str(snapshot / "vocab" / "freq_en_60.pt")}
    assert loaded.name_or_path == "me/tiny-head"


def test_a_head_naming_a_missing_base_folder_says_so(tmp_path):
    _, head = saved_head(tmp_path)
    shutil.rmtree(tmp_path / "base")
    with pytest.raises(FileNotFoundError, match=r"base model folder .*base' does not exist: .*base_model="):
        FastMTPForCausalLM.from_pretrained(head)
    # ... and the way out works.
    assert FastMTPForCausalLM.from_pretrained(head, base_model=tiny_fastmtp("llama").model).head is not None


def test_a_base_neither_cached_nor_local_while_offline_is_named(tmp_path, offline_hub):
    _, head = saved_head(tmp_path)
    config = json.loads((head / "config.json").read_text())
    (head / "config.json").write_text(json.dumps({**config, "base_model_name_or_path": "someone/absent-base"}))
    with pytest.raises(OSError, match=r"'someone/absent-base' is not in the Hugging Face cache.*base_model="):
        FastMTPForCausalLM.from_pretrained(head)


def test_push_to_hub_uploads_exactly_the_saved_folder(tmp_path, monkeypatch):
    model, head = saved_head(tmp_path)
    uploads = []

    def create_repo(self, repo_id, **kwargs):
        assert kwargs["exist_ok"] is True
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        uploads.append(
            (
                repo_id,
                {
                    p.relative_to(folder_path).as_posix(): p.read_bytes()
                    for p in Path(folder_path).rglob("*")
                    if p.is_file()
                },
            )
        )
        return "commit"

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    assert model.push_to_hub("me/tiny-head") == "commit"

    [(repo_id, uploaded)] = uploads
    assert repo_id == "me/tiny-head"
    saved = {p.relative_to(head).as_posix(): p.read_bytes() for p in head.rglob("*") if p.is_file()}
    assert set(uploaded) == set(saved)
    for name in set(saved) - {"README.md"}:
        assert uploaded[name] == saved[name], name
    assert 'from_pretrained("me/tiny-head", trust_remote_code=True)' in uploaded["README.md"].decode()


def test_model_card():
    model = tiny_fastmtp("qwen2")
    model.config.base_model_name_or_path = "Qwen/Qwen2.5-0.5B-Instruct"
    stats = {"num_draft_tokens": 3, "tau": 2.66, "acceptance_cumulative": [0.81, 0.56, 0.36]}
    card = model_card(
        model.config,
        {"repo_id": "me/head", "datasets": ["tatsu-lab/alpaca", "openai/gsm8k"], "stats": {"Spec-Bench": stats}},
    )
    assert card.startswith("---\nbase_model: Qwen/Qwen2.5-0.5B-Instruct\n")
    assert "license: cc-by-nc-4.0" in card and "non-commercial use only" in card
    assert "| Spec-Bench | 3 | 2.66 | 81% / 56% / 36% |" in card
    assert 'FastMTPForCausalLM.from_pretrained("me/head")' in card
    assert 'AutoModelForCausalLM.from_pretrained("me/head", trust_remote_code=True)' in card
    assert "fastmtp export --format sglang" in card

    plain = model_card(tiny_fastmtp("llama").config)
    assert "license" not in plain and "Not recorded." in plain and "sglang" not in plain
    assert "## Acceptance" not in plain


def test_head_naming_a_missing_vocab_map_fails_clearly(tmp_path):
    model = tiny_fastmtp("llama")
    model.set_draft_vocab_maps({"en": torch.arange(30)})
    model.save_pretrained(tmp_path / "head")
    (tmp_path / "head" / "vocab" / "freq_en_30.pt").unlink()
    with pytest.raises(FileNotFoundError, match="freq_en_30.pt is missing"):
        FastMTPForCausalLM.from_pretrained(tmp_path / "head", base_model=model.model)
