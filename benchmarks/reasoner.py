"""Qwen2.5-VL reasoner throughput: our JAX model vs transformers on the same small random config.

Run:  python benchmarks/reasoner.py [--layers 4 --hidden 256 --prompt 128 --new 64 --batch 1 4 --repeats 3]

Prints prefill and decode tokens/s for both and the ratio (JAX / torch). Prefill is one forward over
the prompt; decode rate is ``batch * (new - 1) / (t(generate new) - t(generate 1))`` for both sides
(greedy, no stop tokens), so it excludes prefill. float32 on CPU (or the default JAX device).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax
import numpy as np
from timing import median_time  # noqa: E402
import torch


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--intermediate", type=int, default=704)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    from transformers import Qwen2_5_VLConfig as HFConfig  # noqa: PLC0415
    from transformers import Qwen2_5_VLForConditionalGeneration as HFModel  # noqa: PLC0415

    from got_jax.models.qwen2_5_vl import forward, generate, load_hf_checkpoint  # noqa: PLC0415

    half = args.hidden // args.heads // 2
    section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    cfg = HFConfig(text_config=dict(vocab_size=args.vocab, hidden_size=args.hidden,
                                    intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                                    num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
                                    rope_scaling={"type": "mrope", "mrope_section": section}),
                   vision_config=dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, fullatt_block_indexes=[0],
                                      out_hidden_size=args.hidden),
                   image_token_id=args.vocab - 1, video_token_id=args.vocab - 2, vision_start_token_id=args.vocab - 3,
                   vision_end_token_id=args.vocab - 4, tie_word_embeddings=True)
    torch.manual_seed(0)
    hf = HFModel(cfg).eval().float()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = load_hf_checkpoint(d)

    rows = []
    for b in args.batch:
        ids = np.random.RandomState(b).randint(0, args.vocab - 8, (b, args.prompt))
        tids = torch.tensor(ids)

        def jax_prefill():
            jax.block_until_ready(forward(model, ids).logits)

        def jax_gen(n):
            return lambda: jax.block_until_ready(generate(model, ids, max_new_tokens=n, stop_token_ids=()).tokens)

        def torch_prefill():
            with torch.no_grad():
                hf(input_ids=tids, use_cache=False)

        def torch_gen(n):
            def run():
                with torch.no_grad():
                    hf.generate(input_ids=tids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                eos_token_id=None, pad_token_id=0)
            return run

        r = args.repeats
        jp, tp = median_time(jax_prefill, r), median_time(torch_prefill, r)
        jd = median_time(jax_gen(args.new), r) - median_time(jax_gen(1), r)
        td = median_time(torch_gen(args.new), r) - median_time(torch_gen(1), r)
        ntok = b * (args.new - 1)
        rows.append((b, b * args.prompt / jp, b * args.prompt / tp, ntok / jd, ntok / td))

    print(f"\nQwen2.5-VL reasoner, {args.layers} layers, hidden {args.hidden}, heads {args.heads}/{args.kv_heads}, "
          f"vocab {args.vocab}, prompt {args.prompt}, {args.new} new tokens, float32, "
          f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads)")
    print(f"{'batch':>5} | {'prefill tok/s jax':>17} {'torch':>10} {'ratio':>6} | {'decode tok/s jax':>16} "
          f"{'torch':>10} {'ratio':>6}")
    for b, jp, tp, jd, td in rows:
        print(f"{b:>5} | {jp:>17.0f} {tp:>10.0f} {jp / tp:>6.2f} | {jd:>16.0f} {td:>10.0f} {jd / td:>6.2f}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
