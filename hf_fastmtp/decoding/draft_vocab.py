"""
Draft vocabularies: which token ids the head drafts over, and which one a prompt's language selects.

Two words, two things: a *vocabulary map* is a ranked list of token ids (most frequent first) for one language, or
"all", kept in a `freq_<key>_<size>.pt` file (FastMTP's, FR-Spec's and SGLang's token-map format); a *draft
vocabulary* is the top N of one map with its lm_head rows, what a draft step computes logits over.
"""

from __future__ import annotations

import importlib
import os
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .cpu_kernels import is_cpu_float32
from .draft_weights import DraftWeight, WeightSource

if TYPE_CHECKING:
    from torch import nn

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


class DraftVocabularies:
    """
    A model's vocabulary maps (language code or "all" -> token ids, most frequent first), the default one, and the
    draft vocabularies sliced from them: each sliced once and reused while the lm_head's weights are unchanged.
    """

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size
        self.maps: dict[str, torch.LongTensor] = {}
        self.default: str | None = None
        self._sliced: dict[tuple[str, int, str], DraftVocabulary] = {}

    def set_maps(self, maps: dict[str, torch.Tensor], default: str | None = None) -> None:
        """Validates and replaces the maps; `default` (else "all", else the first) serves undetected languages."""
        validated = {key: validate_vocab_map(ids, self.vocab_size, source=f"map {key!r}") for key, ids in maps.items()}
        if default is not None and default not in validated:
            raise DraftVocabError(f"Default draft vocabulary {default!r} is not among the maps {sorted(validated)}.")
        self.maps = validated
        self._sliced.clear()
        self.default = default if default is not None else "all" if "all" in validated else next(iter(validated), None)

    def get(self, name: str, size: int | None, lm_head: nn.Module, weight_format: str = "native") -> DraftVocabulary:
        """The map `name`'s `size` most frequent ids (all by default) and their lm_head rows in `weight_format`."""
        token_ids = self.maps[name]
        size = token_ids.numel() if size is None else size
        if not 0 < size <= token_ids.numel():
            raise ValueError(f"Draft vocabulary {name!r} has {token_ids.numel()} tokens; cannot take the top {size}.")
        weight, bias = lm_head.weight, getattr(lm_head, "bias", None)
        if not is_cpu_float32(weight):  # (compact copies are a CPU float32 kernel choice)
            weight_format = "native"
        sliced = self._sliced.get((name, size, weight_format))
        # A slice is reused until the lm_head's weights change (a move, a reload).
        if sliced is None or not sliced.source.matches(weight, bias):
            ids = token_ids[:size].to(weight.device)
            rows = DraftWeight.compact(weight[ids], None if bias is None else bias[ids], weight_format)
            sliced = DraftVocabulary(name, ids, rows, source=WeightSource(weight, bias))
            self._sliced[(name, size, weight_format)] = sliced
        return sliced

    def resolve(
        self,
        draft_vocab: str | int | None,
        lm_head: nn.Module,
        prompt_language: Callable[[], str | None],
        weight_format: str = "native",
    ) -> tuple[DraftVocabulary | None, str | None]:
        """
        The draft vocabulary a call's `draft_vocab` names, and the prompt's language when "auto" read it. `draft_vocab`
        is "full", "auto" (the map of the prompt's language, else the default map; the default when maps exist), a
        language code, an int (the top-N of the overall map "all"), or "<language or auto>:<N>".
        """
        if draft_vocab is None:
            draft_vocab = "auto" if self.maps else "full"
        if draft_vocab == "full":
            return None, None
        name, size = parse_draft_vocab(draft_vocab)
        if not self.maps:
            raise ValueError(
                f"`draft_vocab={draft_vocab!r}` needs vocabulary maps, and this model has none: use 'full'."
            )
        language = None
        if name == "auto":
            language = prompt_language()
            name = language if language in self.maps else self.default
        if name not in self.maps:
            raise ValueError(f"No draft vocabulary {name!r}: this model has {sorted(self.maps)} (or 'full').")
        return self.get(name, size, lm_head, weight_format), language


def parse_draft_vocab(draft_vocab: str | int) -> tuple[str, int | None]:
    """`draft_vocab` as (map name or "auto", size or None): 2048 -> ("all", 2048), "zh:4096" -> ("zh", 4096)."""
    if isinstance(draft_vocab, int) and not isinstance(draft_vocab, bool):
        return "all", draft_vocab
    if not isinstance(draft_vocab, str):
        raise ValueError(f"`draft_vocab` must be 'full', 'auto', a language code or an int, got {draft_vocab!r}.")
    name, _, size_text = draft_vocab.partition(":")
    if size_text and not size_text.isdigit():
        raise ValueError(f"`draft_vocab={draft_vocab!r}`: the size after ':' must be an integer.")
    return name, int(size_text) if size_text else None


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
    "DraftVocabularies",
    "DraftVocabulary",
    "detect_language",
    "last_user_message",
    "load_vocab_map",
    "parse_vocab_map_filename",
    "validate_vocab_map",
    "vocab_map_filename",
]
