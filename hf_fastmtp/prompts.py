"""Chat prompts: how every part of hf_fastmtp turns a user message into model inputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

DEMO_PROMPTS = (
    "Explain in three sentences why the sky is blue.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Give three tips for staying healthy.",
    "请用两句话介绍一下长城。",
)


def encode_chat(tokenizer: PreTrainedTokenizerBase, user_message: str) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` for one user turn, with the model's chat template when it has one."""
    if not user_message.strip():
        raise ValueError("The prompt is empty.")
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": user_message}]
        return dict(
            tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        )
    return dict(tokenizer(user_message, return_tensors="pt"))


def encode_chats(
    tokenizer: PreTrainedTokenizerBase, user_messages: Sequence[str], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """A batch of user turns as `encode_chat` encodes each, left-padded (the padding a decoder-only batch needs)."""
    if tokenizer.chat_template:
        texts = [
            tokenizer.apply_chat_template(
                [{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False
            )
            for message in user_messages
        ]
    else:
        texts = list(user_messages)
    padding_token = tokenizer.pad_token
    if padding_token is None:  # (padding needs a token; plain generate pads finished rows with EOS alike)
        tokenizer.pad_token = tokenizer.eos_token
    try:
        encoded = tokenizer(
            texts,
            padding=True,
            padding_side="left",
            return_tensors="pt",
            add_special_tokens=not tokenizer.chat_template,
        )
    finally:
        tokenizer.pad_token = padding_token
    return {key: value.to(device) for key, value in encoded.items()}
