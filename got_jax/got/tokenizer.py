"""Tokenizer helpers: token ids looked up by name, GoT chat prompts, and a small bundled tokenizer.

The real reasoner uses the Qwen2.5-VL tokenizer plus 66 GoT tokens; it comes with a checkpoint
folder and cannot be downloaded here. For tests and demos we bundle a small byte-level BPE
tokenizer (``got_jax/assets/tokenizer/``, regenerated deterministically by
:func:`make_tokenizer`) with the same special tokens in the same order, the same
pre-tokenizer and the real Qwen2.5-VL chat template, saved by transformers so that
``AutoTokenizer.from_pretrained`` loads it through the same code path as a real Qwen folder.
Ids differ from the real tokenizer, so code must use :func:`got_token_ids`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from got_jax.models.qwen2_5_vl.processing import make_image_processor, preprocess_images  # noqa: F401 (re-export)

BUNDLED_TOKENIZER_DIR = Path(__file__).resolve().parent.parent / "assets" / "tokenizer"

# Qwen2.5's added tokens, in vocabulary order (151643 ... 151664); (name, special).
QWEN2_5_ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
)

IM_GEN_START = "<|im_gen_start|>"
IM_GEN_END = "<|im_gen_end|>"
NUM_QUERY_TOKENS = 64
IMAGE_PAD = "<|image_pad|>"
REASONER_IMAGE_SIZE = 448  # source / fed-back images reach the reasoner at 448x448 (bicubic), as released
# The GoT tokens, in the released order (they follow <|file_sep|> in the real vocabulary).
GOT_TOKENS: tuple[str, ...] = (IM_GEN_START, IM_GEN_END) + tuple(
    f"<|im_gen_{i:04d}|>" for i in range(NUM_QUERY_TOKENS)
)

# Qwen2.5-VL-Instruct's chat template (chat_template.json of the released folder).
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

T2I_PROMPT = "Follow the caption to generate an image through a chain of thought process: {caption}"
EDIT_PROMPT = "Follow the instruction to edit the given image through a chain of thought process: {instruction}"


class TokenizerError(ValueError):
    """A tokenizer that lacks a token GoT needs (the message names it)."""


@dataclasses.dataclass(frozen=True)
class GotTokenIds:
    """Ids of every special token the GoT pipeline uses, looked up by name."""

    im_gen_start: int
    im_gen_end: int
    query: tuple[int, ...]  # <|im_gen_0000|> ... <|im_gen_0063|>
    box_start: int
    box_end: int
    object_ref_start: int
    object_ref_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    im_start: int
    im_end: int
    endoftext: int


def _token_id(tokenizer, name: str) -> int:
    vocab = tokenizer.get_vocab()
    if name not in vocab:
        where = getattr(tokenizer, "name_or_path", type(tokenizer).__name__)
        if name in GOT_TOKENS:
            fix = ("GoT's 66 tokens are missing: this is a plain Qwen2.5-VL tokenizer (a folder converted before "
                   "the converter added them, or a --ckpt made by got_jax.convert.qwen2_5_vl). Convert the GoT-6B "
                   "checkpoint again with `python -m got_jax.convert.got_checkpoint --got_dir ... --qwen_dir ... "
                   "--sdxl_dir ... --out ... --overwrite`, which adds them in the released order")
        else:
            fix = "GoT needs Qwen2.5's special tokens: pass the tokenizer of Qwen2.5-VL (or of a converted GoT folder)"
        raise TokenizerError(f"tokenizer {where!r} has no token {name!r}: {fix}")
    return int(vocab[name])


def got_token_ids(tokenizer) -> GotTokenIds:
    """The GoT special-token ids of ``tokenizer``; raises :class:`TokenizerError` naming a missing token."""
    t = lambda name: _token_id(tokenizer, name)  # noqa: E731
    return GotTokenIds(
        im_gen_start=t(IM_GEN_START),
        im_gen_end=t(IM_GEN_END),
        query=tuple(t(name) for name in GOT_TOKENS[2:]),
        box_start=t("<|box_start|>"),
        box_end=t("<|box_end|>"),
        object_ref_start=t("<|object_ref_start|>"),
        object_ref_end=t("<|object_ref_end|>"),
        vision_start=t("<|vision_start|>"),
        vision_end=t("<|vision_end|>"),
        image_pad=t("<|image_pad|>"),
        im_start=t("<|im_start|>"),
        im_end=t("<|im_end|>"),
        endoftext=t("<|endoftext|>"),
    )


def load_tokenizer(path: str | os.PathLike | None = None):
    """``AutoTokenizer.from_pretrained(path)``; default: the bundled small test tokenizer."""
    from transformers import AutoTokenizer

    path = BUNDLED_TOKENIZER_DIR if path is None else Path(path)
    if not (Path(path) / "tokenizer_config.json").exists():
        raise FileNotFoundError(f"no tokenizer_config.json in tokenizer folder {str(path)!r}")
    return AutoTokenizer.from_pretrained(str(path))


def chat_messages(text: str, with_image: bool) -> list[dict]:
    """The single user turn of a GoT prompt (image item first for editing)."""
    if with_image:
        content = [{"type": "image"}, {"type": "text", "text": EDIT_PROMPT.format(instruction=text)}]
    else:
        content = [{"type": "text", "text": T2I_PROMPT.format(caption=text)}]
    return [{"role": "user", "content": content}]


def chat_prompt(tokenizer, text: str, with_image: bool) -> str:
    """The GoT T2I (``with_image=False``) or edit prompt through the tokenizer's chat template.

    One user turn, generation prompt added. For editing the image item (one
    ``<|vision_start|><|image_pad|><|vision_end|>``, expanded to the real number of pad
    tokens by the processor) comes before the instruction.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise TokenizerError(f"tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat template")
    return tokenizer.apply_chat_template(chat_messages(text, with_image), tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, text: str, n_image_tokens: int = 0) -> list[int]:
    """Token ids of the GoT prompt for ``text``: :func:`chat_prompt` (an edit prompt when ``n_image_tokens``)
    with its one ``<|image_pad|>`` expanded to ``n_image_tokens`` copies, tokenised without special tokens.

    The one prompt builder: the sampling pipeline and the training data pipeline both call it, so both see
    the same tokens.
    """
    prompt = chat_prompt(tokenizer, text, with_image=n_image_tokens > 0)
    if n_image_tokens:
        prompt = prompt.replace(IMAGE_PAD, IMAGE_PAD * int(n_image_tokens), 1)
    return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])


def reasoner_image(image, image_processor, size: int = REASONER_IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray, int]:
    """What the reasoner sees of a source image: resized to ``size`` x ``size`` (bicubic, as released) and
    run through ``image_processor`` (:func:`make_image_processor`). Returns ``(pixel_values (patches,
    patch_dim) float32, image_grid_thw (1, 3), number of <|image_pad|> tokens)``. The one image path of
    sampling and training.
    """
    from PIL import Image  # noqa: PLC0415

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, np.uint8))
    pv, grid = preprocess_images([img.convert("RGB").resize((size, size), Image.BICUBIC)], image_processor)
    return pv, grid, int(np.prod(grid, axis=-1).sum()) // image_processor.merge_size ** 2


# --------------------------------------------------------------------------------------------
# The bundled tokenizer


def _corpus() -> list[str]:
    """A small, deterministic English corpus of GoT-style sentences (shapes, colours, positions)."""
    import itertools

    colors = ["red", "green", "blue", "yellow", "orange", "purple", "pink", "brown", "black", "white", "gray",
              "cyan", "magenta"]
    shapes = ["circle", "square", "triangle", "rectangle", "star", "ellipse", "apple", "cat", "dog", "car",
              "tree", "house", "cup", "ball", "bird", "flower", "chair", "table", "person", "boat"]
    sizes = ["small", "large", "big", "tiny", "tall", "wide"]
    places = ["left", "right", "top", "bottom", "center", "middle", "above", "below", "next to", "behind",
              "in front of", "on", "under", "near"]
    out = []
    for i, (c, s, z, p) in enumerate(itertools.islice(itertools.product(colors, shapes, sizes, places), 0, None, 7)):
        c2, s2 = colors[(i * 5 + 3) % len(colors)], shapes[(i * 3 + 1) % len(shapes)]
        out.append(f"A {z} {c} {s} is {p} a {c2} {s2}.")
        out.append(f"Follow the caption to generate an image through a chain of thought process: a {c} {s}")
        out.append(f"Follow the instruction to edit the given image through a chain of thought process: "
                   f"change the {s} to {c2}")
        out.append(f"The image shows a {c} {s} ({i % 1000},{(i * 7) % 1000}),({(i * 13) % 1000},{(i * 17) % 1000}) "
                   f"on the {p} side of the picture, with a {c2} background.")
    out.append("0123456789 The the This There These That and of with to in is are a an at by, . ( ) : ; ! ? ' \"")
    return out


def make_tokenizer(out_dir: str | os.PathLike = BUNDLED_TOKENIZER_DIR, vocab_size: int = 640) -> Path:
    """(Re)build the bundled tokenizer into ``out_dir`` deterministically (temp folder + rename)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AddedToken, Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    bpe = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    vocab = bpe.get_vocab()
    import json

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
              for m in json.loads(bpe.to_str())["model"]["merges"]]

    # Reserve the added tokens' ids in the released order before the wrapper registers its
    # eos / pad tokens (which would otherwise take the next free ids in its own order).
    added = [(name, special) for name, special in QWEN2_5_ADDED_TOKENS] + [(name, True) for name in GOT_TOKENS]
    vocab = dict(vocab)
    for name, _ in added:
        vocab[name] = len(vocab)
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                         unk_token=None, bos_token=None, errors="replace", model_max_length=32768)
    for name, special in added:
        tok.add_tokens([AddedToken(name, special=special, normalized=False)], special_tokens=special)
    tok.chat_template = QWEN2_5_VL_CHAT_TEMPLATE

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tokenizer_tmp_", dir=out_dir.parent))
    try:
        tok.save_pretrained(str(tmp))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


if __name__ == "__main__":  # python -m got_jax.got.tokenizer [out_dir]
    import sys

    print(make_tokenizer(*sys.argv[1:2]))
