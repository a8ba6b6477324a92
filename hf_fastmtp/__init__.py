"""hf_fastmtp: FastMTP speculative decoding (arXiv 2509.18362) as a drop-in for Hugging Face Transformers."""

from .decoding.candidate_generator import FastMTPCandidateGenerator
from .decoding.configuration_fastmtp import FastMTPConfig
from .decoding.modeling_fastmtp import FastMTPForCausalLM, HeadMismatchError
from .decoding.mtp_head import FastMTPHead
from .decoding.stats import FastMTPStats

__version__ = "0.1.0"

__all__ = [
    "FastMTPCandidateGenerator",
    "FastMTPConfig",
    "FastMTPForCausalLM",
    "FastMTPHead",
    "FastMTPStats",
    "HeadMismatchError",
    "load_default",
]


def load_default(*args, **kwargs):
    """The embedded default: SmolLM2-135M-Instruct with its FastMTP head. See `hf_fastmtp.embedded.load_default`."""
    from .embedded import load_default as _load_default

    return _load_default(*args, **kwargs)
