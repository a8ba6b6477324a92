"""Draft vocabularies: which token ids the head drafts over, and which one a prompt's language selects."""

from __future__ import annotations

import importlib
import os
import re
import unicodedata
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .draft_weights import DraftWeight, WeightSource

CODE_SYMBOLS = set("{}[]();=<>#*/\\|&%$_+-`'\":")
MIN_LETTERS = 4
MIN_CONFIDENCE = 0.8
VOCAB_MAP_NAME = re.compile(r"freq_(?P<key>[A-Za-z-]+)_(?P<size>\d+)\.pt")


@dataclass(frozen=True)
class DraftVocabulary:
    """A restricted drafting vocabulary and the lm_head rows for it, sliced once and reused for every step."""

    name: str
    token_ids: torch.LongTensor
    lm_head: DraftWeight
    source: WeightSource  # the model's lm_head weights the rows were sliced from: they are reused while unchanged

    @property
    def size(self) -> int:
        return self.token_ids.numel()


class DraftVocabError(ValueError):
    """A vocabulary map that cannot be used with this model."""


def validate_vocab_map(token_ids, vocab_size: int, source: str = "map") -> torch.LongTensor:
    """
    Checks a map in the format of SGLang's `--speculative-token-map` and FR-Spec (a 1-D integer tensor of token
    ids, most frequent first) and returns it as int64.
    """
    if not isinstance(token_ids, torch.Tensor):
        raise DraftVocabError(f"{source}: expected a 1-D tensor of token ids, got {type(token_ids).__name__}.")
    if token_ids.dtype.is_floating_point or token_ids.dtype.is_complex or token_ids.dtype == torch.bool:
        raise DraftVocabError(f"{source}: token ids must be integers, got dtype {token_ids.dtype}.")
    if token_ids.ndim != 1:
        raise DraftVocabError(f"{source}: expected a 1-D tensor of token ids, got shape {tuple(token_ids.shape)}.")
    if token_ids.numel() == 0:
        raise DraftVocabError(f"{source}: the map is empty.")
    token_ids = token_ids.to(torch.long)
    low, high = int(token_ids.min()), int(token_ids.max())
    if low < 0 or high >= vocab_size:
        raise DraftVocabError(
            f"{source}: token ids range over [{low}, {high}] but this model's vocabulary has {vocab_size} tokens: "
            "the map was built for another tokenizer."
        )
    if torch.unique(token_ids).numel() != token_ids.numel():
        raise DraftVocabError(f"{source}: the map lists some token ids more than once.")
    return token_ids


def load_vocab_map(path: str | os.PathLike, vocab_size: int) -> torch.LongTensor:
    try:
        token_ids = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as error:  # torch reports bad pickles with many exception types
        raise DraftVocabError(f"{path}: not a readable torch tensor file ({error}).") from error
    return validate_vocab_map(token_ids, vocab_size, source=str(path))


def vocab_map_filename(key: str, size: int) -> str:
    """`freq_<key>_<size>.pt`: the naming of FastMTP's and FR-Spec's released maps, and of this package's."""
    return f"freq_{key}_{size}.pt"


def parse_vocab_map_filename(name: str) -> tuple[str, int] | None:
    """`freq_zh_16384.pt` -> ("zh", 16384); None for any other file name."""
    match = VOCAB_MAP_NAME.fullmatch(name)
    return (match["key"], int(match["size"])) if match else None


def detect_language(text: str) -> str | None:
    """
    Language code of a user message, or `None` when it is too short, mostly code, or undetectable (callers then
    use their default map). Deterministic: langdetect is seeded.
    """
    letters = [c for c in text if c.isalpha()]
    if len(letters) < MIN_LETTERS:
        return None
    visible = [c for c in text if not c.isspace()]
    if sum(c in CODE_SYMBOLS for c in visible) / len(visible) >= 0.12:
        return None
    cjk = sum("CJK" in unicodedata.name(c, "") for c in letters)
    if cjk / len(letters) >= 0.3:
        return "zh"
    try:
        langdetect = importlib.import_module("langdetect")
    except ImportError:
        return None
    langdetect.DetectorFactory.seed = 0
    try:
        best = langdetect.detect_langs(text)[0]
    except langdetect.LangDetectException:
        return None
    return best.lang.split("-")[0] if best.prob >= MIN_CONFIDENCE else None


def last_user_message(prompt_text: str, tokenizer) -> str:
    """
    The last user turn of a chat-formatted prompt: the chat template is rendered around a sentinel to learn what
    surrounds a user message, so that system prompts (often English) do not decide the language.
    """
    if not getattr(tokenizer, "chat_template", None):
        return prompt_text
    sentinel = "\ue000FASTMTP\ue000"
    try:
        rendered = tokenizer.apply_chat_template([{"role": "user", "content": sentinel}], tokenize=False)
    except Exception:  # templates that need other roles or arguments: fall back to the whole prompt
        return prompt_text
    before = rendered.split(sentinel)[0]
    opener = before[-min(len(before), 24) :].lstrip("\n")
    if not opener or opener not in prompt_text:
        return prompt_text
    message = prompt_text.rsplit(opener, 1)[1]
    closer = rendered.split(sentinel)[1].strip()[:12]
    return message.split(closer)[0] if closer else message


__all__ = [
    "DraftVocabError",
    "DraftVocabulary",
    "detect_language",
    "last_user_message",
    "load_vocab_map",
    "parse_vocab_map_filename",
    "validate_vocab_map",
    "vocab_map_filename",
]
