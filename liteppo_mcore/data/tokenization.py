"""Tokenizer loading (local directories only) and prompt rendering (chat template or plain text)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..config.schema import DataConfig, ModelConfig
from .errors import DataError

Messages = list[dict[str, str]]
PromptInput = str | Messages
# Between a plain-text system prompt and the prompt when the tokenizer has no chat template.
PLAIN_SYSTEM_SEPARATOR = "\n\n"


def load_tokenizer(path: str) -> Any:
    """A transformers tokenizer from a local directory; nothing is fetched from the network."""
    from transformers import AutoTokenizer

    if not os.path.isdir(path):
        raise DataError(
            f"tokenizer directory {path!r} does not exist (relative paths are read from {os.getcwd()!r}). "
            "Set model.tokenizer_path (or model.hf_path) to a local directory holding tokenizer.json "
            "or the model's tokenizer files."
        )
    present = [name for name in TOKENIZER_FILES if os.path.isfile(os.path.join(path, name))]
    if not present:
        raise DataError(
            f"{path}: no tokenizer files in this directory (none of {', '.join(TOKENIZER_FILES)}); a model folder "
            "with weights only cannot tokenize. Set model.tokenizer_path to the directory of the model's "
            "tokenizer (save_pretrained writes one), or copy its tokenizer files next to the weights."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # transformers raises many types here (OSError, ValueError, KeyError ...)
        raise DataError(
            f"{path}: cannot load a tokenizer from this directory ({type(e).__name__}: {e}). "
            "It needs tokenizer.json (or the model's own tokenizer files) and tokenizer_config.json, "
            "as written by save_pretrained."
        ) from e
    if len(tokenizer) < MIN_VOCAB:
        raise DataError(
            f"{path}: the tokenizer loaded from here has {len(tokenizer)} tokens (files: {', '.join(present)}): "
            "it is empty or incomplete. Set model.tokenizer_path to the model's full tokenizer directory."
        )
    return tokenizer


# What a tokenizer directory holds (at least one): transformers' fast and slow formats.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                   "spiece.model", "merges.txt")
MIN_VOCAB = 4  # fewer tokens than this cannot write text (transformers may give 1 for an empty folder)


def tokenizer_from_config(model: ModelConfig, data: DataConfig) -> Any:
    """The run's tokenizer: model.tokenizer_path, else model.hf_path, else the built-in task's tokenizer."""
    path = model.tokenizer_path or model.hf_path
    if path:
        return load_tokenizer(path)
    if data.builtin_task:
        from .builtin_tasks import get_builtin_task
        from .builtin_tokenizer import build_builtin_tokenizer

        get_builtin_task(data.builtin_task)  # an unknown name fails here, listing the valid ones
        return build_builtin_tokenizer()
    raise DataError(
        "no tokenizer: model.tokenizer_path, model.hf_path and data.builtin_task are all null. "
        "Set model.tokenizer_path (or model.hf_path) to a local tokenizer directory, or use a built-in task."
    )


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(
    tokenizer: Any, prompt: PromptInput, *, system: str | None = None, use_chat_template: bool = True
) -> str:
    """The text the model is conditioned on.

    With a chat template (and ``use_chat_template``): system + user messages rendered with the
    generation prompt appended. Otherwise the prompt itself, after the system prompt and a blank line.
    ``prompt`` may be a string or a list of ``{"role", "content"}`` messages (chat template only).
    """
    return render_prompts(tokenizer, [prompt], [system], use_chat_template=use_chat_template)[0]


def render_prompts(
    tokenizer: Any, prompts: Sequence[PromptInput], systems: Sequence[str | None], *, use_chat_template: bool = True
) -> list[str]:
    """``render_prompt`` for many prompts at once (one template call: much faster on large datasets)."""
    if use_chat_template and has_chat_template(tokenizer):
        if not prompts:
            return []
        conversations = [_messages(p, s) for p, s in zip(prompts, systems)]
        return list(tokenizer.apply_chat_template(conversations, tokenize=False, add_generation_prompt=True))
    if any(not isinstance(p, str) for p in prompts):
        raise DataError(
            "a prompt given as a list of messages needs a chat template, and this tokenizer has none "
            "(or data.apply_chat_template is false). "
            "Give prompts as plain strings, or use a tokenizer with a chat template."
        )
    plain = [str(p) for p in prompts]
    return [p if s is None else s + PLAIN_SYSTEM_SEPARATOR + p for p, s in zip(plain, systems)]


def _messages(prompt: PromptInput, system: str | None) -> Messages:
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if system is not None and not (messages and messages[0].get("role") == "system"):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def encode_rendered(tokenizer: Any, texts: Sequence[str], *, templated: bool, chunk: int = 1024) -> list[list[int]]:
    """Token ids of rendered prompts.

    Chat-template output already holds the model's special tokens (BOS included where the model
    wants one), so it is encoded without adding more; plain text gets the tokenizer's usual ones.
    """
    ids: list[list[int]] = []
    for start in range(0, len(texts), chunk):
        batch = list(texts[start : start + chunk])
        ids.extend(tokenizer(batch, add_special_tokens=not templated, return_attention_mask=False)["input_ids"])
    return ids
