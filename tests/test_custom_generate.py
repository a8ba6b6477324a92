"""A saved head as a `custom_generate` repo: `base.generate(custom_generate=head, trust_remote_code=True)`."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub
import pytest
import torch
from conftest import tiny_base, tiny_tokenizer
from test_hub import COMMIT, WITHOUT_HF_FASTMTP, lay_out_hub_cache, offline_hub, subprocess_env  # noqa: F401 (offline_hub: a fixture)
from test_stopping import WORDS
from tokenizers import decoders
from transformers import AutoModelForCausalLM

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.decoding import generate_with_head

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [[5, 17, 3, 42, 8, 61, 2]]


@pytest.fixture(autouse=True)
def head_environment(tmp_path, monkeypatch):
    """
    The head runs its repo's copy of the decoding modules, which conftest's calibration fixture does not reach: no
    calibration (K as asked), and no cache of hf_fastmtp's outside `tmp_path`.
    """
    monkeypatch.setenv("HF_FASTMTP_CACHE", str(tmp_path / "hf_fastmtp"))
    monkeypatch.setenv("HF_FASTMTP_CALIBRATION", "off")


@pytest.fixture
def head(tmp_path) -> Path:
    """A head initialised from its tiny Llama base (so that it drafts some right tokens), saved with an English map."""
    model = FastMTPForCausalLM.from_base(tiny_base("llama"))
    model.model.save_pretrained(tmp_path / "base")
    model.config.base_model_name_or_path = str(tmp_path / "base")
    model.set_draft_vocab_maps({"en": torch.arange(60)})
    model.save_pretrained(tmp_path / "head")
    return tmp_path / "head"


def users_model(head: Path) -> AutoModelForCausalLM:
    """The user's own model: the base, loaded by Transformers, unwrapped."""
    return AutoModelForCausalLM.from_pretrained(head.parent / "base").eval()


def greedy(model, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
    return model.generate(input_ids, do_sample=False, max_new_tokens=24, **kwargs)


def test_save_pretrained_writes_the_custom_generate_folder(head):
    assert (head / "custom_generate" / "generate.py").read_text() == Path(generate_with_head.__file__).read_text()
    requirements = (head / "custom_generate" / "requirements.txt").read_text().split()
    assert requirements == ["torch>=2.4", "transformers>=5.20", "safetensors", "huggingface_hub"]
    assert 'custom_generate="path/to/this-head", trust_remote_code=True' in (head / "README.md").read_text()


def test_greedy_output_is_the_models_own(head):
    base = users_model(head)
    weights = set(base.state_dict())
    input_ids = torch.tensor(PROMPT)
    plain = greedy(base, input_ids)
    fast = greedy(base, input_ids, custom_generate=str(head), trust_remote_code=True, num_draft_tokens=3)
    assert torch.equal(fast, plain)
    assert set(base.state_dict()) == weights  # the head is kept beside the user's model, not inside it
    stats = base.last_fastmtp_stats
    assert stats.new_tokens == 24 and stats.max_draft_tokens == 3
    assert stats.accepted_per_position[0] > 0  # drafts were accepted: the speculative path is what was compared

    batch = torch.tensor([[0, 0, 0, 9, 4, 33], [5, 17, 3, 42, 8, 61]])  # left-padded (pad id 0)
    attention_mask = (torch.arange(6) >= torch.tensor([[3], [0]])).long()
    plain = greedy(base, batch, attention_mask=attention_mask)
    fast = greedy(base, batch, attention_mask=attention_mask, custom_generate=str(head), trust_remote_code=True)
    assert torch.equal(fast, plain)


def test_options_pass_through_and_the_head_loads_once(head, monkeypatch):
    base = users_model(head)
    loads = []
    load = AutoModelForCausalLM.from_pretrained.__func__

    def counted(cls, *args, **kwargs):
        loads.append(args[0])
        return load(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(counted))
    input_ids = torch.tensor(PROMPT)
    plain = greedy(base, input_ids)

    def fast(**options):
        output = greedy(base, input_ids, custom_generate=str(head), trust_remote_code=True, **options)
        assert torch.equal(output, plain), options
        return base.last_fastmtp_stats

    assert fast(num_draft_tokens=2, draft_vocab="en:40").max_draft_tokens == 2
    assert base.last_fastmtp_stats.draft_vocab_size == 40
    assert fast(draft_vocab="full").draft_vocab_size == 97
    never_drafts = fast(num_draft_tokens=3, draft_confidence_threshold=1.0)
    assert never_drafts.cycles_by_drafts[0] == never_drafts.cycles > 0
    with pytest.raises(ValueError, match="prompt lookup would never run"):  # FastMTP's own checks see the options
        fast(num_draft_tokens=0, prompt_lookup_num_tokens=4)
    assert loads == [str(head)]

    tokenizer = tiny_tokenizer(WORDS)  # a word for each of the 97 ids
    tokenizer.backend_tokenizer.decoder = decoders.Fuse()
    stop = {"stop_strings": tokenizer.convert_ids_to_tokens(int(plain[0, 12])), "tokenizer": tokenizer}
    stopped = greedy(base, input_ids, custom_generate=str(head), trust_remote_code=True, **stop)
    assert torch.equal(stopped, greedy(base, input_ids, **stop)) and stopped.shape[1] <= 13


def test_a_base_the_head_was_not_trained_for_is_refused(head):
    other = tiny_base("llama", vocab_size=101)
    with pytest.raises(ValueError, match=r"trained for a different base model \(vocab_size: head expects 97"):
        greedy(other, torch.tensor(PROMPT), custom_generate=str(head), trust_remote_code=True)


def test_called_other_than_through_custom_generate_says_how(head):
    with pytest.raises(RuntimeError, match="custom_generate=HEAD_REPO_OR_FOLDER, trust_remote_code=True"):
        generate_with_head.generate(model=users_model(head), inputs=torch.tensor(PROMPT), max_new_tokens=4)


@pytest.mark.usefixtures("offline_hub")
def test_a_repo_id_from_an_offline_hub_cache(head):
    lay_out_hub_cache(Path(huggingface_hub.constants.HF_HUB_CACHE), "me/tiny-head", head)
    base = users_model(head)
    input_ids = torch.tensor(PROMPT)
    fast = greedy(base, input_ids, custom_generate="me/tiny-head", trust_remote_code=True, revision=COMMIT)
    assert torch.equal(fast, greedy(base, input_ids))
    assert base.last_fastmtp_stats.cycles > 0


SCRIPT = (
    WITHOUT_HF_FASTMTP
    + """
base = AutoModelForCausalLM.from_pretrained(sys.argv[1])
input_ids = torch.tensor([[5, 17, 3, 42, 8, 61, 2]])
plain = base.generate(input_ids, do_sample=False, max_new_tokens=24)
report = {"plain": plain.tolist()}
for head in sys.argv[2:]:
    fast = base.generate(input_ids, do_sample=False, max_new_tokens=24, custom_generate=head, trust_remote_code=True)
    report[head] = {"fast": fast.tolist(), "stats": base.last_fastmtp_stats.to_dict()}
report["loaded"] = sorted(name for name in sys.modules if name.startswith("hf_fastmtp"))
print(json.dumps(report))
"""
)


def test_without_hf_fastmtp_from_a_folder_and_an_offline_hub_cache(head, tmp_path):
    lay_out_hub_cache(tmp_path / "hub", "me/tiny-head", head)
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SCRIPT), str(tmp_path / "base"), str(head), "me/tiny-head"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**subprocess_env(tmp_path), "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_FASTMTP_CALIBRATION": "off"},
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["loaded"] == []
    assert report["plain"] == greedy(users_model(head), torch.tensor(PROMPT)).tolist()
    for repo in (str(head), "me/tiny-head"):
        assert report[repo]["fast"] == report["plain"], repo
        assert report[repo]["stats"]["cycles"] > 0, repo
