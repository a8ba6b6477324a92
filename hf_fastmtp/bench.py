"""Timing plain decoding against FastMTP, fairly: same inputs, interleaved runs."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .candidate_generator import FastMTPStats
from .modeling_fastmtp import FastMTPForCausalLM


@dataclass
class Run:
    """One timed generate() call."""

    new_token_ids: list[int]
    seconds: float
    stats: FastMTPStats | None = None

    @property
    def tokens_per_second(self) -> float:
        return len(self.new_token_ids) / self.seconds if self.seconds else 0.0


def timed_generate(
    model: FastMTPForCausalLM, inputs: dict[str, torch.Tensor], fastmtp: bool, **generate_kwargs
) -> Run:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    output = model.generate(**inputs, fastmtp=fastmtp, **generate_kwargs)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    seconds = time.perf_counter() - start
    prompt_length = inputs["input_ids"].shape[1]
    return Run(output[0, prompt_length:].tolist(), seconds, model.last_fastmtp_stats)
