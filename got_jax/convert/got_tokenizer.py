"""The tokenizer of a converted GoT folder: Qwen2.5-VL's tokenizer with GoT's 66 tokens.

GoT added ``<|im_gen_start|>``, ``<|im_gen_end|>`` and ``<|im_gen_0000|>`` ... ``<|im_gen_0063|>`` to the
Qwen2.5 tokenizer, in that order (ids 151665 ... 151730 on the real vocabulary), and resized the token
embedding to hold them. :func:`stage_got_tokenizer` takes the tokenizer from the first folder that ships
one (GoT's own folder first, then Qwen2.5-VL's), adds the GoT tokens in the released order when it lacks
them, checks that every id the pipeline uses lands on a row of the checkpoint's embedding, and saves it
with the processor files beside it. Any mismatch is a :class:`CheckpointError` naming the token, its id
and the row count.
"""

from __future__ import annotations

import logging
import os
import shutil
from typing import Sequence

from got_jax.checkpoint import CheckpointError
from got_jax.got.tokenizer import GOT_TOKENS, TokenizerError, got_token_ids

log = logging.getLogger(__name__)

# Files of the processor / generation setup copied beside the saved tokenizer (first folder that has each).
PROCESSOR_FILES = ("preprocessor_config.json", "video_preprocessor_config.json", "processor_config.json",
                   "chat_template.json", "generation_config.json")


def ships_tokenizer(folder: str | None) -> bool:
    """Whether ``folder`` holds a loadable tokenizer (its config plus the vocabulary)."""
    if not folder or not os.path.isdir(folder):
        return False
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return has("tokenizer_config.json") and (has("tokenizer.json") or has("vocab.json"))


def _load(folder: str):
    from transformers import AutoTokenizer  # noqa: PLC0415

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:  # noqa: BLE001  transformers raises many kinds; name the folder
        raise CheckpointError(f"tokenizer in {folder}: cannot load it ({type(e).__name__}: {e})") from None


def add_got_tokens(tok, where: str) -> bool:
    """Adds the 66 GoT tokens in the released order unless ``tok`` has them all; returns whether it added.

    A tokenizer with only some of them is an error (it belongs to neither Qwen2.5-VL nor GoT).
    """
    from transformers import AddedToken  # noqa: PLC0415

    vocab = tok.get_vocab()
    have = [t for t in GOT_TOKENS if t in vocab]
    if len(have) == len(GOT_TOKENS):
        return False
    if have:
        missing = [t for t in GOT_TOKENS if t not in vocab]
        raise CheckpointError(f"tokenizer in {where} has {len(have)} of GoT's 66 tokens but lacks {missing[:3]} "
                              f"({len(missing)} missing): pass a Qwen2.5-VL tokenizer without them or GoT's own")
    first = len(tok)
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in GOT_TOKENS], special_tokens=True)
    vocab = tok.get_vocab()
    ids = [vocab.get(t) for t in GOT_TOKENS]
    if ids != list(range(first, first + len(GOT_TOKENS))):
        raise CheckpointError(f"tokenizer in {where}: GoT's tokens got ids {ids[:3]}... instead of {first}... "
                              f"(the tokenizer's ids are not contiguous)")
    return True


def check_rows(tok, rows: int, where: str, rows_from: str) -> None:
    """Every token id (GoT's and the special ones the pipeline uses) must be a row of the embedding."""
    try:
        got_token_ids(tok)  # every special token the pipeline looks up by name
    except TokenizerError as e:
        raise CheckpointError(f"tokenizer in {where}: {e}") from None
    vocab = tok.get_vocab()
    over = [t for t in GOT_TOKENS if vocab[t] >= rows]
    top_name, top = max(vocab.items(), key=lambda kv: kv[1])
    if over or top >= rows:
        name = over[0] if over else top_name
        raise CheckpointError(f"tokenizer in {where}: token {name!r} has id {vocab[name]}, but the checkpoint's "
                              f"token embedding ({rows_from}) has only {rows} rows: the tokenizer does not belong "
                              f"to this checkpoint (pass GoT's tokenizer, or the Qwen2.5-VL folder GoT was "
                              f"trained from, as --qwen_dir)")


def stage_got_tokenizer(folders: Sequence[str | None], rows: int, dest: str, *, rows_from: str = "") -> dict[str, str]:
    """Saves the GoT tokenizer + processor files into ``dest``; returns ``{file name: path}``.

    ``folders`` are searched in order for a tokenizer (see :func:`ships_tokenizer`) and for each
    processor file; ``rows`` is the checkpoint's embedding row count.
    """
    src = next((f for f in folders if ships_tokenizer(f)), None)
    if src is None:
        searched = ", ".join(repr(f) for f in folders if f)
        raise CheckpointError(f"no tokenizer found (tokenizer_config.json with tokenizer.json or vocab.json) in "
                              f"{searched}: pass --qwen_dir with the Qwen2.5-VL-3B-Instruct folder")
    tok = _load(src)
    if add_got_tokens(tok, src):
        log.info("added GoT's 66 tokens to the tokenizer of %s (ids %d..%d)", src, len(tok) - 66, len(tok) - 1)
    check_rows(tok, rows, src, rows_from or "model.embed_tokens.weight")
    os.makedirs(dest, exist_ok=True)
    tok.save_pretrained(dest)
    for name in PROCESSOR_FILES:
        if os.path.exists(os.path.join(dest, name)):
            continue
        for folder in folders:
            p = os.path.join(folder, name) if folder else None
            if p and os.path.isfile(p):
                shutil.copyfile(p, os.path.join(dest, name))
                break
    return {name: os.path.join(dest, name) for name in sorted(os.listdir(dest))
            if os.path.isfile(os.path.join(dest, name))}
