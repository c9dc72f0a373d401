"""GoT-specific pieces: the reasoning-chain text, spatial layouts, tokenizer helpers (and later SSGM / pipeline)."""

from got_jax.got.layout import draw_overlay, render_layout_canvases, save_layout_grid, to_model_range
from got_jax.got.text import Box, GotTextError, Plan, format_got, parse_got, parse_got_report
from got_jax.got.tokenizer import (
    GotTokenIds,
    TokenizerError,
    chat_prompt,
    got_token_ids,
    load_tokenizer,
    make_image_processor,
)

__all__ = [
    "Box", "GotTextError", "GotTokenIds", "Plan", "TokenizerError", "chat_prompt", "draw_overlay", "format_got",
    "got_token_ids", "load_tokenizer", "make_image_processor", "parse_got", "parse_got_report",
    "render_layout_canvases", "save_layout_grid", "to_model_range",
]
