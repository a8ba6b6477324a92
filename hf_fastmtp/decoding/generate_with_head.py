"""
FastMTP on a model of one's own, through Transformers' `custom_generate`: this file is the
`custom_generate/generate.py` of every saved head (`save_custom_generate` puts it there), so that

    model = AutoModelForCausalLM.from_pretrained(base)
    model.generate(**inputs, custom_generate="me/my-head", trust_remote_code=True)

drafts with the head in "me/my-head" (a Hub repo or a local folder) and verifies with `model`: the output is `model`'s
own. It takes the options of `FastMTPForCausalLM.generate(fastmtp=True)` (`num_draft_tokens`, `draft_vocab`,
`draft_confidence_threshold`, `prompt_lookup_num_tokens`, ...), and afterwards `model.last_fastmtp_stats` holds the
call's `FastMTPStats`.

It needs no hf_fastmtp: the head loads with the code its repo carries (`trust_remote_code`). It imports nothing
relatively, since Transformers fetches a repo's `custom_generate/` imports from that folder alone.
"""

from __future__ import annotations

import inspect
import os
import shutil
from pathlib import Path

from transformers import AutoModelForCausalLM, PreTrainedModel

CUSTOM_GENERATE_DIR = "custom_generate"
# Checked by Transformers before it runs this file (`check_python_requirements`): hf_fastmtp's own lower bounds.
REQUIREMENTS = ("torch>=2.4", "transformers>=5.20", "safetensors", "huggingface_hub")
# `generate` keywords that say where the head's files are, not how to generate (Transformers also fetches this file
# with them).
HUB_KWARGS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def generate(model: PreTrainedModel, **kwargs):
    """
    `model.generate(**kwargs)` with FastMTP drafting by the head of the repo named by `custom_generate` (Transformers
    calls this function with every other argument of that call). The head is loaded on the first call for a model and
    kept on it for the next ones.
    """
    repo = custom_generate_repo(model)
    hub_kwargs = {key: kwargs.pop(key) for key in HUB_KWARGS if key in kwargs}
    fastmtp_model = with_head(model, repo, hub_kwargs)
    # The defaults plain `model.generate` would use, even if they changed since the head was loaded.
    fastmtp_model.generation_config = model.generation_config
    kwargs.setdefault("fastmtp", True)
    model.last_fastmtp_stats = None
    output = fastmtp_model.generate(**kwargs)
    model.last_fastmtp_stats = fastmtp_model.last_fastmtp_stats
    return output


def with_head(model: PreTrainedModel, repo: str, hub_kwargs: dict) -> PreTrainedModel:
    """
    `model` wrapped in the repo's `FastMTPForCausalLM`, once per head, revision, device and dtype: later calls keep
    its calibration and draft vocabularies. Kept in a plain dict so that `model` does not take the wrapper (which
    holds `model`) as a submodule.
    """
    heads = model.__dict__.setdefault("_fastmtp_heads", {})
    key = (repo, hub_kwargs.get("revision"), str(model.device), model.dtype)
    if key not in heads:
        heads[key] = AutoModelForCausalLM.from_pretrained(repo, trust_remote_code=True, base_model=model, **hub_kwargs)
    return heads[key]


def custom_generate_repo(model: PreTrainedModel) -> str:
    """
    The `custom_generate` argument of the `model.generate` call that runs this function: the head's repo or folder.
    Transformers passes every argument of that call but this one (5.20-5.25), and the head's config and weights are
    only there, so it is read from the call's frame (`custom_generate` and `self` are `generate`'s public names).
    """
    frame = inspect.currentframe()
    try:
        while frame is not None:
            if frame.f_code.co_name == "generate" and frame.f_locals.get("self") is model:
                repo = frame.f_locals.get("custom_generate")
                if isinstance(repo, str):
                    return repo
            frame = frame.f_back
    finally:
        del frame
    raise RuntimeError(
        "This is a FastMTP head's `custom_generate/generate.py`: call it as "
        "`model.generate(**inputs, custom_generate=HEAD_REPO_OR_FOLDER, trust_remote_code=True)`."
    )


def save_custom_generate(folder: str | os.PathLike) -> None:
    """Makes a head folder a `custom_generate` repo: this file as `custom_generate/generate.py`, and requirements."""
    target = Path(folder) / CUSTOM_GENERATE_DIR
    target.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(__file__, target / "generate.py")
    (target / "requirements.txt").write_text("\n".join(REQUIREMENTS) + "\n", encoding="utf-8")
