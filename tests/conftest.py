"""Tiny random models of every supported architecture, and the real embedded model for slow tests."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
import transformers
from packaging.version import Version
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from hf_fastmtp import FastMTPForCausalLM
from hf_fastmtp.decoding import calibration, modeling_fastmtp
from hf_fastmtp.decoding.calibration import CALIBRATED_ROWS, Calibration, calibration_key
from hf_fastmtp.decoding.cpu_kernels import (
    LINEAR_KERNELS,
    CPUKernels,
    KernelChoice,
    prepacking_available,
    shape_name,
)

# One torch thread per test process: tiny models run fastest so, and `.ci/run` starts one pytest-xdist worker per core.
torch.set_num_threads(1)

ARCHITECTURES = ("llama", "qwen2", "mistral", "gemma3")
# Transformers 5.23 added what one of FastMTP's savings asks for: keeping only the last hidden state of a forward
# (`output_hidden_states=-1`). Earlier versions generate the same tokens without it; tests of the saving skip there.
needs_transformers_5_23 = pytest.mark.skipif(
    Version(transformers.__version__) < Version("5.23"), reason="needs transformers >= 5.23"
)
COMMON = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    bos_token_id=0,
    eos_token_id=None,
    pad_token_id=0,
)


def tiny_base(architecture: str, vocab_size: int = 97, seed: int = 0, sharpness: float = 1.0):
    """A random causal LM; `sharpness` scales the lm_head so its distributions are peaked rather than flat."""
    torch.manual_seed(seed)
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, **COMMON))
    elif architecture == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=vocab_size, **COMMON))
    elif architecture == "mistral":
        # A window shorter than the test sequences, so the sliding-window paths are exercised.
        model = MistralForCausalLM(MistralConfig(vocab_size=vocab_size, sliding_window=16, **COMMON))
    elif architecture == "qwen3":  # (not among ARCHITECTURES: only the attention tests take it)
        model = Qwen3ForCausalLM(Qwen3Config(vocab_size=vocab_size, head_dim=8, **COMMON))
    elif architecture == "gemma3":
        config = Gemma3TextConfig(vocab_size=vocab_size, head_dim=8, sliding_window=16, **COMMON)
        model = Gemma3ForCausalLM(config)
    else:
        raise ValueError(architecture)
    if sharpness != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(sharpness)
    return model.eval()


def tiny_fastmtp(architecture: str = "llama", vocab_size: int = 97, seed: int = 0, sharpness: float = 1.0):
    """A tiny FastMTP model whose head is random (seeded), so drafts are sometimes right, mostly wrong."""
    base = tiny_base(architecture, vocab_size, seed, sharpness)
    model = FastMTPForCausalLM.from_base(base)
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.normal_(0, 0.2) if parameter.ndim > 1 else parameter.fill_(1.0)
    # A fixed K by default, so that tests of drafting draft: "auto" would mostly choose plain steps for a random head
    # on a model this small (its own tests ask for it by name).
    model.generation_config.num_draft_tokens = 3
    return model.eval()


CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_tokenizer(words: Sequence[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words` with a ChatML template, EOS and padding: a real tokenizer, offline."""
    special = ["<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: index for index, token in enumerate([*special, "user", "assistant", *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.add_special_tokens(special)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        chat_template=CHAT_TEMPLATE,
    )


@pytest.fixture(params=ARCHITECTURES)
def architecture(request) -> str:
    return request.param


@pytest.fixture(autouse=True, scope="session")
def calibration_cache(tmp_path_factory):
    """Calibrations measured by the tests go to a folder of their own, not the user's cache."""
    folder = tmp_path_factory.mktemp("calibration")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(calibration, "calibration_dir", lambda: folder)
        yield


@pytest.fixture
def one_thread():
    """
    These tiny models' products take microseconds: with two threads, each waits for the other core, which another
    process on a busy machine may hold for milliseconds. One thread keeps the tests fast anywhere (and restored).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def every_kernel(model, kernel: str, draft_weights: str) -> KernelChoice:
    """`kernel` for every linear layer shape of `model` and row count, grouped attention at every query count."""
    shapes = {shape_name(module.weight) for module in model.modules() if isinstance(module, torch.nn.Linear)}
    return KernelChoice(
        linear={shape: (kernel,) * CALIBRATED_ROWS for shape in shapes},
        grouped_attention_queries=tuple(range(1, CALIBRATED_ROWS + 1)),
        draft_weights=draft_weights,
    )


def use_kernels(monkeypatch, kernel: str, draft_weights: str, forward_seconds: Sequence[float] | None = None) -> None:
    """Every model generates with `every_kernel` (and, for "auto", these costs) instead of a measured calibration."""
    forward_seconds = list(forward_seconds or [1.0] * CALIBRATED_ROWS)

    def calibration(model, remeasure=False):
        choice = every_kernel(model, kernel, draft_weights)
        return Calibration(calibration_key(model), choice, forward_seconds, forward_seconds, draft_step_seconds=0.01)

    monkeypatch.setattr(modeling_fastmtp, "load_or_calibrate", calibration)


def kernel_entries(monkeypatch) -> list:
    """A list that gets an item each time a `generate` call enters `CPUKernels` (calibration's own runs aside)."""
    entered = []

    class CountedKernels(CPUKernels):
        def __enter__(self):
            entered.append(1)
            return super().__enter__()

    monkeypatch.setattr(modeling_fastmtp, "CPUKernels", CountedKernels)
    return entered


KERNEL_SETTINGS = [("weight_first", "float16"), ("stock", "int8")] + (
    [("prepacked", "native")] if prepacking_available() else []
)


@pytest.fixture(params=KERNEL_SETTINGS, ids=lambda setting: "-".join(setting))
def draft_weights(request, monkeypatch) -> str:
    """Runs a test with each linear kernel and each format of the head's compact draft weights (and draft rows)."""
    kernel, weight_format = request.param
    assert kernel in LINEAR_KERNELS
    use_kernels(monkeypatch, kernel, weight_format)
    return weight_format


@pytest.fixture(scope="session")
def smollm2():
    """The embedded default (SmolLM2-135M-Instruct + shipped head), loaded once per test session."""
    from hf_fastmtp import load_default

    torch.manual_seed(0)
    return load_default()


# The tiny bases have 2 decoder layers: hidden states 0 (embeddings), 1 and 2 (the final normed one).
CONFIGURATIONS = {
    "features": {"feature_layers": [0, 1, -1]},
    "two-layers": {"num_head_layers": 2},
    "both": {"feature_layers": [1, 2], "num_head_layers": 2},
}
NEW_PARTS = ("feature_proj.", "extra_layers.")


def configured_fastmtp(architecture: str, configuration: str, random_new_parts: bool = True, **kwargs):
    """`tiny_fastmtp`'s head expanded to `configuration`; its new parts random (not reproducing the one-layer head)."""
    model = tiny_fastmtp(architecture, **kwargs)
    model.expand_head(**CONFIGURATIONS[configuration])
    if random_new_parts:
        torch.manual_seed(7)
        with torch.no_grad():
            for name, parameter in model.head.named_parameters():
                if name.startswith(NEW_PARTS):
                    parameter.normal_(0, 0.2) if parameter.ndim > 1 else parameter.fill_(1.0)
    return model.eval()
