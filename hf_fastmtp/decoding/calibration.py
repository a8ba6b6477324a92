"""
Calibration: what each kernel and each verification forward costs on the machine FastMTP runs on, measured once.

Every kernel choice (`cpu_kernels.KernelChoice`) is taken only where it was measured faster than Transformers' own
kernel on this machine, and the measured costs of verifying n tokens and of a draft step drive `num_draft_tokens=
"auto"` (`draft_length.py`). A calibration is measured once per (CPU or GPU model, PyTorch version, thread count,
dtype, model shapes), in seconds for a small model, and kept as JSON in `~/.cache/hf_fastmtp/calibration/`
(`HF_FASTMTP_CACHE`); a file that cannot be read or was measured for something else is measured anew, never trusted.
`fastmtp calibrate` shows the table and reruns it.

How it measures: every candidate is timed in turn, interleaved, for a few rounds, and each one's best round counts
(another process on a core only ever adds time). A candidate other than Transformers' own is chosen only where it
beat it by `MARGIN`. Then the whole verification forward is timed for n = 1..`CALIBRATED_ROWS` new tokens after a
`CONTEXT_TOKENS` cache, under the choice and under Transformers' kernels, interleaved: where the choice is not faster
at n, products of n rows go back to Transformers' kernels, so that no forward runs slower than stock. Products of
more rows than a verification has (`KERNEL_ROWS` up to 64: a batch decoding or verifying) are chosen on their own
timings, with the same margin. Last, a forward from an empty cache over `PREFILL_POSITIONS` tokens: how a prefill's
cost grows with its length, from which a batch's prefill is split into groups of similar length where that is cheaper
(`prefill.py`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import transformers
from torch import nn
from transformers.cache_utils import DynamicCache
from transformers.utils import is_torch_greater_or_equal
from transformers.utils.logging import tqdm

from .appending_cache import append_in_place
from .atomic_files import replaced_atomically
from .cpu_kernels import (
    KERNEL_ROWS,
    LINEAR_KERNELS,
    CPUKernels,
    KernelChoice,
    grouped_attention,
    is_cpu_float32,
    linear_product,
    prepack,
    prepacking_available,
    shape_name,
)
from .draft_weights import DRAFT_WEIGHT_FORMATS, DraftWeight, draft_linear, int8_kernel_takes
from .prefill import PREFILL_POSITIONS, ForwardCost, forward_cost
from .transformers_compat import activate_past_recording, attn_implementation, cache_keyword

if TYPE_CHECKING:
    from .modeling_fastmtp import FastMTPForCausalLM

logger = logging.getLogger(__name__)

FORMAT_VERSION = 3  # bumped when what is measured changes: older files are measured anew
CALIBRATED_ROWS = 8  # products and forwards are calibrated for 1..8 rows: up to 7 drafts per cycle
CONTEXT_TOKENS = 256  # the cache a timed verification forward attends over
MARGIN = 0.03  # a kernel other than Transformers' own must be at least this much faster to be chosen
ROUNDS = 5
# A heuristic: more weights than most CPU caches hold, so that products over them run at memory speed, as in a real
# model's forward (each layer shape is timed over its layers up to this many bytes; a shape with fewer bytes in all,
# such as a small model's key/value projections, is timed partly from cache).
MEMORY_BOUND_BYTES = 64 * 2**20
DRAFT_VOCAB_ROWS = 8192  # draft-step products are timed with this many lm_head rows (a draft vocabulary's size)
# "off": no calibration (Transformers' kernels, and `num_draft_tokens="auto"` drafts the head's default K).
CALIBRATION_VARIABLE = "HF_FASTMTP_CALIBRATION"

Clock = Callable[[], float]


def cache_dir() -> Path:
    """The package's cache folder (`HF_FASTMTP_CACHE`, default ~/.cache/hf_fastmtp)."""
    return Path(os.environ.get("HF_FASTMTP_CACHE", Path.home() / ".cache" / "hf_fastmtp"))


@dataclass
class Calibration:
    """
    What was measured on this machine for one model, and what was chosen from it. Seconds are best rounds;
    `forward_seconds[n - 1]` is a verification forward over n new tokens with the kernels chosen (the faster of
    `choice` and Transformers' at that n), `stock_forward_seconds` the same under Transformers' kernels,
    `draft_step_seconds` one recursive step of the head with a draft vocabulary's worth of lm_head rows,
    `prefill_seconds[i]` a forward over `PREFILL_POSITIONS[i]` tokens from an empty cache (none: not measured).
    """

    key: dict[str, Any]
    choice: KernelChoice
    forward_seconds: list[float]
    stock_forward_seconds: list[float]
    draft_step_seconds: float
    linear_seconds: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    attention_seconds: dict[str, list[float]] = field(default_factory=dict)
    draft_weight_seconds: dict[str, float] = field(default_factory=dict)
    prefill_seconds: list[float] = field(default_factory=list)
    seconds_taken: float = 0.0

    def prefill_cost(self) -> ForwardCost | None:
        """Seconds of a forward over n positions from an empty cache (`prefill.forward_cost`); None: not measured."""
        return forward_cost(self.prefill_seconds) if self.prefill_seconds else None

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT_VERSION, **asdict(self)}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        data = json.loads(text)
        if not isinstance(data, dict) or data.pop("format", None) != FORMAT_VERSION:
            raise ValueError("calibration format changed")
        choice = data.pop("choice")
        choice = KernelChoice(
            linear={shape: tuple(kernels) for shape, kernels in choice["linear"].items()},
            grouped_attention_queries=tuple(choice["grouped_attention_queries"]),
            draft_weights=choice["draft_weights"],
        )
        calibration = cls(choice=choice, **data)
        calibration.check()
        return calibration

    def check(self) -> None:
        """Raises ValueError for a calibration that cannot have been measured (a file edited or spoiled)."""
        seconds = [*self.forward_seconds, *self.stock_forward_seconds, self.draft_step_seconds, *self.prefill_seconds]
        kernels = {kernel for row_kernels in self.choice.linear.values() for kernel in row_kernels}
        if (
            len(self.forward_seconds) != CALIBRATED_ROWS
            or len(self.stock_forward_seconds) != CALIBRATED_ROWS
            or len(self.prefill_seconds) not in (0, len(PREFILL_POSITIONS))
            or not all(isinstance(s, (int, float)) and 0 < s < math.inf for s in seconds)
            or not kernels <= set(LINEAR_KERNELS)
            or not all(isinstance(n, int) and 1 <= n <= CALIBRATED_ROWS for n in self.choice.grouped_attention_queries)
            or self.choice.draft_weights not in DRAFT_WEIGHT_FORMATS
        ):
            raise ValueError("implausible calibration values")


def machine_name(device: torch.device) -> str:
    """The processor's model name (a GPU's, on one), as `lscpu` or `nvidia-smi` print it."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def calibration_key(model: FastMTPForCausalLM) -> dict[str, Any]:
    """What a calibration holds for: machine, PyTorch, threads, dtype and the shapes of what is timed."""
    weight = model.get_output_embeddings().weight
    attention = model.config.text_config
    return {
        "machine": machine_name(weight.device),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "device": weight.device.type,
        "dtype": str(weight.dtype).removeprefix("torch."),
        "model_type": attention.model_type,
        "attention": attn_implementation(attention),
        "linear_shapes": sorted({shape_name(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}),
        "num_layers": attention.num_hidden_layers,
        # (Only where not MiMo's one layer: the draft step's cost grows with it; existing calibrations stay valid.)
        **({"head_layers": model.config.num_head_layers} if model.config.num_head_layers != 1 else {}),
        "attention_heads": [
            attention.num_attention_heads,
            getattr(attention, "num_key_value_heads", None),
            getattr(attention, "head_dim", None),
        ],
    }


def calibration_dir() -> Path:
    return cache_dir() / "calibration"


def calibration_path(key: dict[str, Any]) -> Path:
    # (The format is part of the name: an older version of this code, as a head's remote code may be, keeps its own.)
    digest = hashlib.sha256(json.dumps([FORMAT_VERSION, key], sort_keys=True).encode()).hexdigest()[:16]
    return calibration_dir() / f"{digest}.json"


def calibration_enabled() -> bool:
    """`HF_FASTMTP_CALIBRATION`: "on" (the default) or "off"."""
    setting = os.environ.get(CALIBRATION_VARIABLE, "on")
    if setting not in ("on", "off"):
        raise ValueError(f"{CALIBRATION_VARIABLE} must be 'on' or 'off', got {setting!r}.")
    return setting == "on"


def load_or_calibrate(model: FastMTPForCausalLM, remeasure: bool = False) -> Calibration | None:
    """
    This machine's calibration for `model`: read from the cache, or measured (and saved) if there is none, if it
    cannot be read or was measured for another key, or if `remeasure`. None when `HF_FASTMTP_CALIBRATION=off`, or
    when measuring fails (FastMTP then runs with Transformers' kernels and the head's default K).
    """
    if not calibration_enabled():
        return None
    key = calibration_key(model)
    path = calibration_path(key)
    if not remeasure and path.exists():
        try:
            calibration = Calibration.from_json(path.read_text())
            if calibration.key == key:
                return calibration
            logger.warning("The calibration in %s was measured for another setup: measuring again.", path)
        except (OSError, ValueError, TypeError, KeyError) as error:
            logger.warning("The calibration in %s cannot be read (%s): measuring again.", path, error)
    logger.warning("Calibrating FastMTP for this machine (%s), once; kept in %s.", key["machine"], path)
    try:
        calibration = calibrate(model, key)
    except Exception as error:  # a model or build this cannot time: never worth failing `generate` for
        logger.warning("Calibration failed (%s): generating with Transformers' kernels.", error)
        return None
    try:
        save_calibration(calibration, path)
    except OSError as error:
        logger.warning("The calibration cannot be kept in %s (%s): it is used for this process only.", path, error)
    return calibration


def save_calibration(calibration: Calibration, path: Path) -> None:
    """Written beside the target and renamed over it, so that a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with replaced_atomically(path) as staging:
        staging.write_text(calibration.to_json())


def calibrate(
    model: FastMTPForCausalLM,
    key: dict[str, Any] | None = None,
    rounds: int = ROUNDS,
    clock: Clock = time.perf_counter,
) -> Calibration:
    """Measures the kernels (float32 on a CPU), then the verification forwards, a draft step and prefills, and
    chooses."""
    start = clock()
    key = key if key is not None else calibration_key(model)
    linear_seconds, attention_seconds, draft_weight_seconds = {}, {}, {}
    choice = KernelChoice()
    cpu_float32 = is_cpu_float32(model.get_output_embeddings().weight)
    progress = tqdm(total=6 if cpu_float32 else 3, desc="Calibrating", unit="step", leave=False)
    if cpu_float32:
        linear_seconds = measure_linears(model.model, rounds, clock)
        progress.update()
        attention_seconds = measure_attention(model.model, rounds, clock)
        progress.update()
        draft_weight_seconds = measure_draft_weights(model, rounds, clock)
        progress.update()
        choice = KernelChoice(
            linear=without_stock_only({shape: tuple(fastest_per_row(t)) for shape, t in linear_seconds.items()}),
            grouped_attention_queries=tuple(
                n for n, kernel in enumerate(fastest_per_row(attention_seconds), start=1) if kernel != "stock"
            ),
            draft_weights=fastest(draft_weight_seconds),
        )
    forward_seconds, stock_forward_seconds = measure_verification(model, choice, rounds, clock)
    progress.update()
    choice = without_slower_rows(choice, forward_seconds, stock_forward_seconds)
    forward_seconds = [min(pair) for pair in zip(forward_seconds, stock_forward_seconds)]
    draft_step_seconds = measure_draft_step(model, choice, rounds, clock)
    progress.update()
    prefill_seconds = measure_prefill(model, choice, rounds, clock)
    progress.close()
    return Calibration(
        key=key,
        choice=choice,
        forward_seconds=forward_seconds,
        stock_forward_seconds=stock_forward_seconds,
        draft_step_seconds=draft_step_seconds,
        linear_seconds=linear_seconds,
        attention_seconds=attention_seconds,
        draft_weight_seconds=draft_weight_seconds,
        prefill_seconds=prefill_seconds,
        seconds_taken=clock() - start,
    )


# ---------------------------------------------------------------------------------------------------- choosing


def fastest(seconds: dict[str, float]) -> str:
    """The fastest candidate; the first (Transformers' own) unless another beat it by `MARGIN`."""
    reference, *_ = seconds
    best = min(seconds, key=seconds.get)
    return best if seconds[best] < (1 - MARGIN) * seconds[reference] else reference


def fastest_per_row(timings: dict[str, list[float]]) -> list[str]:
    """`fastest` at each row count, from per-kernel lists of seconds by row count (none: nothing was timed)."""
    if not timings:
        return []
    rows = len(next(iter(timings.values())))
    return [fastest({kernel: seconds[row] for kernel, seconds in timings.items()}) for row in range(rows)]


def without_slower_rows(
    choice: KernelChoice, forward_seconds: list[float], stock_forward_seconds: list[float]
) -> KernelChoice:
    """The choice with Transformers' kernels at every row count where the whole forward was not faster."""
    pairs = zip(forward_seconds, stock_forward_seconds)
    slower = {n for n, (ours, stock) in enumerate(pairs, start=1) if ours >= stock}
    if not slower:
        return choice
    linear = {
        shape: tuple("stock" if n in slower else kernel for n, kernel in zip(KERNEL_ROWS, kernels))
        for shape, kernels in choice.linear.items()
    }
    queries = tuple(n for n in choice.grouped_attention_queries if n not in slower)
    return replace(choice, linear=without_stock_only(linear), grouped_attention_queries=queries)


def without_stock_only(linear: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """The shapes that take some other kernel than stock: layers of the others are not wrapped at all."""
    return {shape: kernels for shape, kernels in linear.items() if set(kernels) != {"stock"}}


def best_rounds(
    candidates: dict[str, Callable[[], object]],
    rounds: int,
    clock: Clock,
    before_each: Callable[[], object] | None = None,
) -> dict[str, float]:
    """Times each candidate in turn for `rounds` rounds (after `before_each`, untimed); each one's best round."""
    seconds = dict.fromkeys(candidates, math.inf)
    with torch.no_grad():
        for _ in range(rounds):
            for name, candidate in candidates.items():
                if before_each is not None:
                    before_each()
                started = clock()
                candidate()
                seconds[name] = min(seconds[name], clock() - started)
    return seconds


# ---------------------------------------------------------------------------------------------------- measuring


def measure_linears(model: nn.Module, rounds: int, clock: Clock) -> dict[str, dict[str, list[float]]]:
    """
    Each float32 linear layer shape, each kernel, each row count of `KERNEL_ROWS`: seconds for products over
    the layers of that shape (up to `MEMORY_BOUND_BYTES` of them, so that they are read from memory, as in a forward).
    """
    by_shape: dict[str, list[nn.Linear]] = {}
    for module in model.modules():
        if type(module) is nn.Linear and is_cpu_float32(module.weight):
            layers = by_shape.setdefault(shape_name(module.weight), [])
            if sum(layer.weight.nbytes for layer in layers) < MEMORY_BOUND_BYTES:
                layers.append(module)
    kernels = ["stock", "weight_first"] + (["prepacked"] if prepacking_fits(model) else [])
    timings = {}
    for shape, layers in by_shape.items():
        packed = [prepack(layer.weight) for layer in layers] if "prepacked" in kernels else [None] * len(layers)
        per_kernel = {kernel: [] for kernel in kernels}
        for rows in KERNEL_ROWS:
            input = torch.ones(rows, layers[0].in_features)

            def products(kernel: str, input=input, layers=layers, packed=packed) -> Callable[[], None]:
                return lambda: [
                    linear_product(kernel, input, layer.weight, layer.bias, layer_packed)
                    for layer, layer_packed in zip(layers, packed)
                ]

            seconds = best_rounds({kernel: products(kernel) for kernel in kernels}, rounds, clock)
            for kernel in kernels:
                per_kernel[kernel].append(seconds[kernel])
        timings[shape] = per_kernel
    return timings


def prepacking_fits(model: nn.Module) -> bool:
    """Whether oneDNN is there and a prepacked copy of every linear layer's weights would take at most a quarter
    of the memory still available (it is kept beside the weights while the model lives)."""
    if not prepacking_available():
        return False
    needed = sum(m.weight.nbytes for m in model.modules() if type(m) is nn.Linear and is_cpu_float32(m.weight))
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # (not on every OS)
        return False
    return needed <= available // 4


def measure_attention(model: nn.Module, rounds: int, clock: Clock) -> dict[str, list[float]]:
    """
    Transformers' SDPA attention ("stock") against grouped attention for 1..`CALIBRATED_ROWS` queries after a
    `CONTEXT_TOKENS` cache, on the shapes of the model's first grouped-query attention layer. Empty without one.
    """
    module = next((m for m in model.modules() if getattr(m, "num_key_value_groups", 1) > 1), None)
    if module is None or not hasattr(module, "head_dim") or not is_torch_greater_or_equal("2.5"):
        return {}  # (grouped attention needs PyTorch's `enable_gqa`, 2.5)
    heads = module.config.num_attention_heads
    kv_heads = heads // module.num_key_value_groups
    key = torch.ones(1, kv_heads, CONTEXT_TOKENS + CALIBRATED_ROWS, module.head_dim)
    timings = {"stock": [], "grouped": []}
    for queries in range(1, CALIBRATED_ROWS + 1):
        query = torch.ones(1, heads, queries, module.head_dim)
        keys = key[:, :, : CONTEXT_TOKENS + queries]
        mask = torch.ones(1, 1, queries, keys.shape[2], dtype=torch.bool).tril(CONTEXT_TOKENS)
        attention = {
            "stock": lambda q=query, k=keys, m=mask: grouped_attention(module, q, k, k, m, scaling=0.1),
            "grouped": lambda q=query, k=keys, m=mask, n=queries: grouped_attention(
                module, q, k, k, m, scaling=0.1, queries=frozenset({n})
            ),
        }
        seconds = best_rounds(attention, rounds, clock)
        for kernel, value in seconds.items():
            timings[kernel].append(value * model.config.num_hidden_layers)
    return timings


def measure_draft_weights(model: FastMTPForCausalLM, rounds: int, clock: Clock) -> dict[str, float]:
    """
    A draft step's one-row products (the head's layers and a draft vocabulary's lm_head rows) in each weight format
    this CPU can run, timed cold: a cycle's first draft step follows a verification forward that streamed the model
    through the caches.
    """
    lm_head = model.get_output_embeddings()
    weights = [(linear.weight, linear.bias) for linear in model.head.modules() if type(linear) is nn.Linear]
    weights.append((lm_head.weight[:DRAFT_VOCAB_ROWS], None))
    formats = [f for f in DRAFT_WEIGHT_FORMATS if f != "int8" or all(int8_kernel_takes(w) for w, _ in weights)]
    copies = {f: [DraftWeight.compact(weight, bias, f) for weight, bias in weights] for f in formats}
    inputs = {weight.shape[1]: torch.ones(1, weight.shape[1]) for weight, _ in weights}
    other_memory = torch.empty(MEMORY_BOUND_BYTES // 4)

    def products(weight_format: str) -> Callable[[], None]:
        return lambda: [draft_linear(inputs[draft.weight.shape[1]], draft) for draft in copies[weight_format]]

    try:
        return best_rounds({f: products(f) for f in formats}, rounds, clock, lambda: other_memory.fill_(0.0))
    except (NotImplementedError, RuntimeError):  # a PyTorch build without the int8 kernel for this CPU
        without_int8 = {f: products(f) for f in formats if f != "int8"}
        return best_rounds(without_int8, rounds, clock, lambda: other_memory.fill_(0.0))


def measure_verification(
    model: FastMTPForCausalLM, choice: KernelChoice, rounds: int, clock: Clock
) -> tuple[list[float], list[float]]:
    """The base's forward over n = 1..`CALIBRATED_ROWS` new tokens after a `CONTEXT_TOKENS` cache: under `choice`, and
    under Transformers' kernels, interleaved."""
    base = model.model
    # (a model with learned positions has no more than `max_position_embeddings` of them)
    context = min(CONTEXT_TOKENS, getattr(base.config, "max_position_embeddings", 2**31) - CALIBRATED_ROWS)
    device = model.get_output_embeddings().weight.device
    # (a generator of its own: calibrating must not move the RNG a seeded sampling call goes on with)
    random_ids = torch.randint(model.vocab_size, (1, context + CALIBRATED_ROWS), generator=torch.Generator())
    ids = random_ids.to(device)
    # (the loop's kind of cache: a forward's cost includes the cache's update)
    cache = append_in_place(DynamicCache(config=base.config), capacity=context + CALIBRATED_ROWS)
    activate_past_recording(cache, CALIBRATED_ROWS)  # (sliding-window layers must be able to go back)
    cache_kwargs = {cache_keyword(base.forward): cache, "use_cache": True}
    seconds = {"choice": [math.inf] * CALIBRATED_ROWS, "stock": [math.inf] * CALIBRATED_ROWS}
    with torch.no_grad():
        base(input_ids=ids[:, :context], logits_to_keep=1, **cache_kwargs)
        for _ in range(rounds):
            for name in seconds:
                with CPUKernels(model, choice if name == "choice" else KernelChoice()):
                    for n in range(1, CALIBRATED_ROWS + 1):
                        started = synchronized(clock, device)
                        base(input_ids=ids[:, context : context + n], logits_to_keep=n, **cache_kwargs)
                        seconds[name][n - 1] = min(seconds[name][n - 1], synchronized(clock, device) - started)
                        cache.crop(-n)
    return seconds["choice"], seconds["stock"]


def measure_draft_step(model: FastMTPForCausalLM, choice: KernelChoice, rounds: int, clock: Clock) -> float:
    """One recursive step of the head (its forward and the draft logits over a draft vocabulary's rows)."""
    device = model.get_output_embeddings().weight.device
    hidden = torch.zeros(1, 1, model.config.text_config.hidden_size, device=device, dtype=model.dtype)
    ids = torch.zeros(1, 1, dtype=torch.long, device=device)
    cache = DynamicCache(config=model.head_config)
    best = math.inf
    with torch.no_grad(), CPUKernels(model, choice, draft_modules=model.head):
        rows = DraftWeight.compact(
            model.get_output_embeddings().weight[:DRAFT_VOCAB_ROWS],
            None,
            choice.draft_weights if is_cpu_float32(model.get_output_embeddings().weight) else "native",
        )
        for position in range(rounds + 1):
            started = synchronized(clock, device)
            output = model.mtp_forward(hidden, ids, torch.tensor([[position]], device=device), cache)
            draft_linear(output, rows).argmax(dim=-1)
            if position:  # (the first step warms up)
                best = min(best, synchronized(clock, device) - started)
    return best


def measure_prefill(model: FastMTPForCausalLM, choice: KernelChoice, rounds: int, clock: Clock) -> list[float]:
    """The base's forward over `PREFILL_POSITIONS` tokens from an empty cache, under `choice`: a prompt's prefill."""
    base = model.model
    device = model.get_output_embeddings().weight.device
    if getattr(base.config, "max_position_embeddings", 2**31) < PREFILL_POSITIONS[-1]:
        return []  # (not measured: prompts are then prefilled as one padded batch)
    random_ids = torch.randint(model.vocab_size, (1, PREFILL_POSITIONS[-1]), generator=torch.Generator()).to(device)
    cache_name = cache_keyword(base.forward)

    def forward(n: int) -> Callable[[], None]:
        return lambda: base(
            input_ids=random_ids[:, :n], logits_to_keep=1, use_cache=True, **{cache_name: DynamicCache()}
        )

    with CPUKernels(model, choice):
        seconds = best_rounds(
            {str(n): forward(n) for n in PREFILL_POSITIONS}, rounds, synchronized_clock(clock, device)
        )
    return list(seconds.values())


def synchronized_clock(clock: Clock, device: torch.device) -> Clock:
    """`clock`, read after the accelerator's queued work has finished."""
    return lambda: synchronized(clock, device)


def synchronized(clock: Clock, device: torch.device) -> float:
    """The clock, after the accelerator's queued work has finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
    return clock()


# ---------------------------------------------------------------------------------------------------- showing


def format_calibration(calibration: Calibration) -> str:
    """The calibration as Markdown tables: the machine, each choice with its timings, the verification costs."""
    key = calibration.key
    lines = [
        f"Calibration for {key['machine']} ({key['cpu_capability']}), {key['threads']} threads, torch {key['torch']}, "
        f"{key['dtype']} on {key['device']}; measured in {calibration.seconds_taken:.1f} s.",
        "",
    ]
    choice = calibration.choice
    if calibration.linear_seconds:
        lines += [
            "| linear layer | rows | " + " | ".join(next(iter(calibration.linear_seconds.values()))) + " | chosen |"
        ]
        lines += ["| --- " * (3 + len(next(iter(calibration.linear_seconds.values())))) + "|"]
        for shape, timings in calibration.linear_seconds.items():
            kernels = choice.linear.get(shape, ())
            for entry, rows in enumerate(KERNEL_ROWS[: len(next(iter(timings.values())))]):
                cells = " | ".join(f"{seconds[entry] * 1e3:.3f} ms" for seconds in timings.values())
                lines.append(f"| {shape} | {rows} | {cells} | {kernels[entry] if entry < len(kernels) else 'stock'} |")
        lines.append("")
    if calibration.attention_seconds:
        lines += ["| attention, queries | stock | grouped | chosen |", "| --- | --- | --- | --- |"]
        for n, (stock, grouped) in enumerate(zip(*calibration.attention_seconds.values()), start=1):
            chosen = "grouped" if n in choice.grouped_attention_queries else "stock"
            lines.append(f"| {n} | {stock * 1e3:.3f} ms | {grouped * 1e3:.3f} ms | {chosen} |")
        lines.append("")
    if calibration.draft_weight_seconds:
        cells = ", ".join(f"{name} {s * 1e3:.3f} ms" for name, s in calibration.draft_weight_seconds.items())
        lines += [f"Draft-step weights: {cells}; chosen: {choice.draft_weights}.", ""]
    lines += [
        "| new tokens verified | stock forward | chosen kernels | x one stock token |",
        "| --- | --- | --- | --- |",
    ]
    one = calibration.stock_forward_seconds[0]
    for n, (stock, ours) in enumerate(zip(calibration.stock_forward_seconds, calibration.forward_seconds), start=1):
        lines.append(f"| {n} | {stock * 1e3:.1f} ms | {ours * 1e3:.1f} ms | {ours / one:.2f} |")
    lines += ["", f"A draft step: {calibration.draft_step_seconds * 1e3:.2f} ms."]
    if calibration.prefill_seconds:
        cells = ", ".join(
            f"{n} tokens {s * 1e3:.1f} ms" for n, s in zip(PREFILL_POSITIONS, calibration.prefill_seconds)
        )
        lines.append(f"A prefill from an empty cache: {cells}.")
    return "\n".join(lines)


__all__ = [
    "CALIBRATED_ROWS",
    "Calibration",
    "cache_dir",
    "calibrate",
    "calibration_key",
    "calibration_path",
    "fastest",
    "format_calibration",
    "load_or_calibrate",
]
