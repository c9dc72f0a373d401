"""A PyTorch reference of the released GoT ``generate``, step by step, for parity tests.

This follows the released ``GenCot.generate`` (see ../shared/reference/GOT_SYSTEM.md) on
torch components (transformers' Qwen2.5-VL, diffusers' UNet / VAE / DDPMScheduler, two
``nn.Linear`` projectors), with test-only changes that do not alter the numbers:

* torchvision transforms are replaced by their PIL equivalents (``Resize((h, w), BICUBIC)``
  on a PIL image is ``img.resize((w, h), Image.BICUBIC)``; ``ToTensor`` + ``Normalize(0.5, 0.5)``
  is ``x / 255 * 2 - 1``);
* the Gaussian draws (initial latents and each DDPM variance draw) are recorded, so the JAX
  pipeline can be fed the very same noise;
* transformers 5.x needs ``mm_token_type_ids`` (what its processor returns) to place image tokens
  in M-RoPE; 4.x derived the same positions from the ids, so they are passed here;
* the number of reasoning rounds is bounded (a random tiny model may never emit
  ``<|endoftext|>``), and every intermediate is returned for inspection;
* ``logits_processor`` (optional) is handed to the reasoner's ``generate``: with
  :func:`sampling_processors` the greedy decode becomes top-k / top-p / temperature sampling with
  given Gumbel noise, the way to compare sampled chains with ours under the same draws.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageDraw

BOI_TOKEN = "<|im_gen_start|>"
EOI_TOKEN = "<|im_gen_end|>"
IMG_TOKEN = "<|im_gen_{:04d}|>"
EOS_TOKEN = "<|endoftext|>"
BOV_TOKEN = "<|vision_start|>"
EOV_TOKEN = "<|vision_end|>"
IMG_PAD_TOKEN = "<|image_pad|>"

# The released layout parser: only boxes followed by " (colour)" are painted.
RELEASED_BOX_PATTERN = r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|> \((\w+)\)"


def released_parse_coordinates_colors(cot_text: str) -> list[dict]:
    out = []
    for x1, y1, x2, y2, color in re.findall(RELEASED_BOX_PATTERN, cot_text):
        out.append({"position": [[int(x1), int(y1)], [int(x2), int(y2)]], "color": color})
    return out


def diffusion_transform(img: Image.Image, height: int, width: int) -> torch.Tensor:
    arr = np.asarray(img.convert("RGB").resize((width, height), Image.BICUBIC), dtype=np.float32) / 255.0
    return torch.from_numpy(arr).permute(2, 0, 1) * 2.0 - 1.0


def source_transform(img: Image.Image) -> Image.Image:
    return img.resize((448, 448), Image.BICUBIC)


def sampling_processors(temperature: float, top_k: int, top_p: float, gumbel: np.ndarray):
    """transformers' own logits warpers (temperature, then top-k, then top-p, the order its ``generate``
    applies them when sampling) followed by adding ``gumbel[i]`` (steps, batch, vocab) at generated token
    ``i`` (counted from the first call: one ``generate`` call per list), so a greedy ``generate`` with
    these processors draws ``argmax(warped + gumbel)``, a sample of the warped distribution with the given
    noise (the Gumbel-max trick ``jax.random.categorical`` uses)."""
    from transformers import (LogitsProcessor, LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    class AddGumbel(LogitsProcessor):
        start = None

        def __call__(self, input_ids, scores):
            if self.start is None:
                self.start = input_ids.shape[1]
            step = input_ids.shape[1] - self.start
            if step >= len(gumbel):
                raise ValueError(f"no Gumbel noise for generated token {step} (have {len(gumbel)})")
            return scores + torch.from_numpy(np.asarray(gumbel[step], np.float32)).to(scores.dtype)

    procs = [TemperatureLogitsWarper(temperature)]
    if top_k > 0:
        procs.append(TopKLogitsWarper(top_k))
    if top_p < 1.0:
        procs.append(TopPLogitsWarper(top_p))
    return LogitsProcessorList(procs + [AddGumbel()])


def released_layout_canvases(cot_text: str, height: int, width: int) -> list[Image.Image]:
    positions_colors = released_parse_coordinates_colors(cot_text)
    cond_images = [Image.new("RGB", (width, height), (0, 0, 0)) for _ in range(max(len(positions_colors), 1))]
    for i, p_c in enumerate(positions_colors):
        draw = ImageDraw.Draw(cond_images[i])
        (x1, y1), (x2, y2) = p_c["position"]
        draw.rectangle(((x1 / 1000 * width, y1 / 1000 * height), (x2 / 1000 * width, y2 / 1000 * height)),
                       fill=p_c["color"])
    return cond_images


@dataclass
class ReferenceResult:
    got_text: str
    input_ids: torch.Tensor
    images: list[Image.Image]
    image_arrays: list[np.ndarray] = field(default_factory=list)  # float [0,1] HWC before uint8
    gen_hidden_states: list[torch.Tensor] = field(default_factory=list)
    layout_latents: list[torch.Tensor] = field(default_factory=list)
    reference_latents: list[torch.Tensor] = field(default_factory=list)
    initial_latents: list[torch.Tensor] = field(default_factory=list)
    step_noises: list[list[torch.Tensor]] = field(default_factory=list)
    prompt_len: int = 0


class TorchGoT:
    """The released GoT generate() on torch modules (float32, CPU)."""

    def __init__(self, mllm, projector, projector_add, scheduler, vae, unet, processor, num_img_out_tokens=64):
        self.mllm, self.projector, self.projector_add = mllm, projector, projector_add
        self.scheduler, self.vae, self.unet, self.processor = scheduler, vae, unet, processor
        self.num_img_out_tokens = num_img_out_tokens
        tok = processor.tokenizer
        self.img_gen_start_id = tok.convert_tokens_to_ids(IMG_TOKEN.format(0))

    def _mm_types(self, input_ids, vis) -> dict:
        """transformers 5.x computes M-RoPE image positions from ``mm_token_type_ids`` (its processor's
        output; 4.x, which the released code ran on, derived them from the ids): 1 at image pads."""
        if not vis:
            return {}
        pad = self.processor.tokenizer.convert_tokens_to_ids(IMG_PAD_TOKEN)
        return {"mm_token_type_ids": (input_ids == pad).long()}

    @torch.no_grad()
    def generate(self, text_input, image=None, *, max_new_tokens=32, num_inference_steps=4, guidance_scale=7.5,
                 image_guidance_scale=1.0, cond_image_guidance_scale=4.0, height=64, width=64, input_token_num=256,
                 crops_coords_top_left=(0, 0), prompt_type="t2i", random_seed=42, got_input=None,
                 only_return_got=False, max_rounds=1, logits_processor=None):
        from diffusers.schedulers import scheduling_ddpm
        from transformers import StoppingCriteria, StoppingCriteriaList

        class StopOnToken(StoppingCriteria):
            def __init__(self, token_id):
                self.token_id = token_id

            def __call__(self, input_ids, scores, **kwargs):
                return input_ids[0, -1] == self.token_id

        tok = self.processor.tokenizer
        img_token_ids = torch.tensor([tok.convert_tokens_to_ids(IMG_TOKEN.format(i))
                                      for i in range(self.num_img_out_tokens)]).unsqueeze(0)
        input_token_ids = torch.tensor([tok.convert_tokens_to_ids(IMG_PAD_TOKEN)] * input_token_num).unsqueeze(0)
        boi_token_id = tok.convert_tokens_to_ids(BOI_TOKEN)
        eos_token_id = tok.convert_tokens_to_ids(EOS_TOKEN)
        bov_token_id = tok.convert_tokens_to_ids(BOV_TOKEN)
        stopping = StoppingCriteriaList([StopOnToken(boi_token_id), StopOnToken(bov_token_id),
                                         StopOnToken(eos_token_id)])
        ori_w, ori_h = image.size if image is not None else (width, height)
        input_images = [source_transform(image)] if image is not None else []
        original_images = [image] if image is not None else []
        result = ReferenceResult("", None, [])

        if prompt_type == "t2i":
            prompt = f"Follow the caption to generate an image through a chain of thought process: {text_input}"
        elif prompt_type == "edit":
            prompt = f"Follow the instruction to edit the given image through a chain of thought process: {text_input}"
        else:
            raise ValueError(f"Unknown prompt type {prompt_type}")
        messages = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
        if image is not None:
            messages[0]["content"].insert(0, {"type": "image"})
        text = self.processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        inputs = self.processor(text=[text], images=None if not input_images else input_images, padding=False,
                                return_tensors="pt")
        input_ids = inputs.input_ids
        result.prompt_len = input_ids.shape[1]

        rounds = 0
        while input_ids[0, -1] != eos_token_id and rounds < max_rounds:
            rounds += 1
            input_length = input_ids.shape[1]
            image_inputs = None if not input_images else self.processor.image_processor(images=input_images,
                                                                                       return_tensors="pt")
            # transformers 5.x treats an explicit pixel_values=None as an image input: pass images only if any
            vis = ({} if image_inputs is None else
                   {"pixel_values": image_inputs.pixel_values, "image_grid_thw": image_inputs.image_grid_thw})
            if got_input is None:
                out = self.mllm.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                                         max_new_tokens=max_new_tokens, **vis, **self._mm_types(input_ids, vis),
                                         return_dict_in_generate=True, stopping_criteria=stopping, do_sample=False,
                                         logits_processor=logits_processor)
                input_ids = out["sequences"]
            else:
                input_ids = torch.tensor(tok.encode(got_input)).unsqueeze(0)
                got_input = None
            if only_return_got:
                result.got_text = tok.decode(input_ids[0])
                result.input_ids = input_ids
                return result
            cur_decoded_text = tok.decode(input_ids[0, input_length:], skip_special_tokens=False)
            result.got_text += (cur_decoded_text.replace(EOS_TOKEN, "").replace(EOI_TOKEN, "")
                                .replace(BOV_TOKEN, "").replace(EOV_TOKEN, ""))
            if input_ids[0, -1] == boi_token_id:
                input_ids = torch.cat([input_ids, img_token_ids], dim=1)
                second = self.mllm(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **vis,
                                   **self._mm_types(input_ids, vis),
                                   output_hidden_states=True, return_dict=True)
                last_hidden = second["hidden_states"][-1]
                mask = torch.logical_and(self.img_gen_start_id <= input_ids,
                                         input_ids < self.img_gen_start_id + self.num_img_out_tokens)
                gen_h = last_hidden[mask].view(-1, self.num_img_out_tokens, last_hidden.shape[-1])[-1:]
                result.gen_hidden_states.append(gen_h)
                gen_cond = self.projector(gen_h)
                gen_cond_add = self.projector_add(gen_h)
                null_cond = self.projector(torch.zeros_like(gen_h))
                pooled = torch.mean(gen_cond_add, dim=1)

                self.scheduler.set_timesteps(num_inference_steps)
                generator = torch.Generator().manual_seed(random_seed)
                latents = torch.randn((1, self.vae.config.latent_channels, height // 8, width // 8),
                                      generator=generator, dtype=torch.float32)
                result.initial_latents.append(latents.clone())
                latents = latents * self.scheduler.init_noise_sigma

                original_image = original_images[-1] if original_images else Image.new("RGB", (width, height))
                image_latents = self.vae.encode(diffusion_transform(original_image, height, width)[None]
                                                ).latent_dist.mode()
                result.reference_latents.append(image_latents.clone())
                cond = torch.stack([diffusion_transform(c, height, width)
                                    for c in released_layout_canvases(cur_decoded_text, height, width)])
                embeds = torch.cat([self.vae.encode(cond[i:i + 1]).latent_dist.mode() for i in range(len(cond))])
                unet_cond_embed = embeds.mean(dim=0, keepdim=True)
                result.layout_latents.append(unet_cond_embed.clone())

                zeros_img = torch.zeros_like(image_latents)
                image_latents = torch.cat([image_latents, image_latents, image_latents, zeros_img])
                zeros_lay = torch.zeros_like(unet_cond_embed)
                unet_cond_embed = torch.cat([unet_cond_embed, zeros_lay, zeros_lay, zeros_lay])
                prompt_embeds = torch.cat([gen_cond, gen_cond, null_cond, null_cond])
                time_ids = torch.tensor([[height, width, *crops_coords_top_left, height, width]],
                                        dtype=prompt_embeds.dtype)
                added = {"text_embeds": pooled, "time_ids": time_ids}

                draws: list[torch.Tensor] = []
                orig_randn = scheduling_ddpm.randn_tensor

                def recording_randn(*a, **k):
                    x = orig_randn(*a, **k)
                    draws.append(x.clone())
                    return x

                scheduling_ddpm.randn_tensor = recording_randn
                try:
                    for t in self.scheduler.timesteps:
                        lat_in = self.scheduler.scale_model_input(torch.cat([latents] * 4), t)
                        lat_in = torch.cat([lat_in, image_latents, unet_cond_embed], dim=1)
                        noise_pred = self.unet(lat_in, t, encoder_hidden_states=prompt_embeds,
                                               added_cond_kwargs=added, return_dict=False)[0]
                        e1, e2, e3, e4 = noise_pred.chunk(4)
                        noise_pred = (e4 + guidance_scale * (e2 - e3) + cond_image_guidance_scale * (e1 - e2)
                                      + image_guidance_scale * (e3 - e4))
                        latents = self.scheduler.step(noise_pred, t, latents, generator=generator,
                                                      return_dict=False)[0]
                finally:
                    scheduling_ddpm.randn_tensor = orig_randn
                result.step_noises.append(draws)
                img = self.vae.decode(latents / self.vae.config.scaling_factor).sample
                img = (img / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 0).float().numpy()
                result.image_arrays.append(img)
                pil = Image.fromarray((img * 255).astype("uint8"))
                result.images.append(pil)
                original_images.append(pil)
            elif input_ids[0, -1] == bov_token_id:
                input_images.append(source_transform(result.images[-1]))
                input_ids = torch.cat([input_ids, input_token_ids], dim=1)
        if ori_w < ori_h:
            target = (width, int(height * ori_h / ori_w))
        else:
            target = (int(width * ori_w / ori_h), height)
        result.images = [im.resize(target) for im in result.images]
        result.input_ids = input_ids
        return result
