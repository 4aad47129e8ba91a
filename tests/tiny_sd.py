"""A tiny random-weight Stable Diffusion pipeline, built offline from configs (no download).

`make_tiny_sd_pipeline(out_dir)` writes a folder that `DiffusionPipeline.from_pretrained(out_dir)`
loads offline; a 64x64 image with a few steps takes a fraction of a second on CPU. Weights are
seeded, so two calls write the same tensors.
"""
from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import torch

from mixq_onnx.calib.classes import CIFAR10
from mixq_onnx.calib.prompts import ADJECTIVES

SEED = 1234
MAX_LENGTH = 77
HIDDEN = 32  # text hidden size = UNet cross-attention dim


def _byte_unicode() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for the raw bytes 0..255 (in byte order)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def _words() -> list[str]:
    text = " ".join(CIFAR10 + ADJECTIVES) + " a photo of and"
    return sorted(set(re.findall(r"[a-z]+", text.lower())))


def write_clip_vocab(out_dir: Path) -> Path:
    """Write `vocab.json` + `merges.txt`: every byte symbol, its `</w>` variant, left-to-right merges
    that join each word of the class names and prompt templates, and the two CLIP special tokens."""
    out_dir.mkdir(parents=True, exist_ok=True)
    byte_chars = _byte_unicode()
    tokens: list[str] = list(byte_chars) + [c + "</w>" for c in byte_chars]
    merges: list[tuple[str, str]] = []
    seen_tokens = set(tokens)
    seen_merges: set[tuple[str, str]] = set()
    for word in _words():
        symbols = list(word)  # ASCII letters are their own byte symbols
        symbols[-1] += "</w>"
        merged = symbols[0]
        for sym in symbols[1:]:
            pair = (merged, sym)
            merged += sym
            if pair not in seen_merges:
                seen_merges.add(pair)
                merges.append(pair)
            if merged not in seen_tokens:
                seen_tokens.add(merged)
                tokens.append(merged)
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return out_dir


def make_tiny_sd_pipeline(out_dir: Path) -> Path:
    """Build and save a tiny StableDiffusionPipeline with seeded random weights; returns `out_dir`."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = write_clip_vocab(Path(tmp))
        tokenizer = CLIPTokenizer.from_pretrained(str(tok_dir), model_max_length=MAX_LENGTH)

    torch.manual_seed(SEED)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=HIDDEN,
        attention_head_dim=8,
        norm_num_groups=32,
    )
    torch.manual_seed(SEED + 1)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(8, 8, 16, 16),  # four levels: latent = image / 8, like SD
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
    )
    torch.manual_seed(SEED + 2)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )).eval()
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
        skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder, tokenizer=tokenizer, unet=unet.eval(), scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(out_dir))
    return out_dir


if __name__ == "__main__":  # python tests/tiny_sd.py OUT_DIR
    import sys

    print(make_tiny_sd_pipeline(Path(sys.argv[1])))
