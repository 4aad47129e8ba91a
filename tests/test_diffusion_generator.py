"""The `diffusion` generator on a tiny random-weight Stable Diffusion pipeline (real diffusers, offline)."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest
import torch

from mixq_onnx.calib.classes import load_classes
from mixq_onnx.calib.generators.base import GENERATORS, GenContext
from mixq_onnx.calib.generators.diffusion import DiffusionGenerator
from mixq_onnx.calib.prompts import PromptConfig, plan_images
from mixq_onnx.errors import MixqError

sys.path.insert(0, str(Path(__file__).resolve().parent))

SEED = 7
SIZE = 32
VOCAB = load_classes("cifar10")


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))  # the file-hash memo


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: a 2-core box shared with other jobs slows 10x from oversubscription. (CPU bytes
    also depend on the thread count, so every comparison here runs within this one setting.)"""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_gen(pipeline, strategy="mixup", size=SIZE, **options) -> DiffusionGenerator:
    opts = {"pipeline": str(pipeline), "steps": 2, "batch_size": 2, **options}
    ctx = GenContext(num=8, seed=SEED, size=size, prompts=PromptConfig(strategy), vocab=VOCAB, model=None,
                     device=torch.device("cpu"), options=opts, log=lambda msg: None)
    gen = DiffusionGenerator(ctx)
    gen.validate()
    return gen


def plans(strategy, start=0, stop=4):
    return plan_images(PromptConfig(strategy), VOCAB, SEED, start, stop)


def test_registered():
    assert GENERATORS["diffusion"] is DiffusionGenerator
    assert DiffusionGenerator.uses_prompts


def test_tiny_pipeline_loads_offline(tiny_pipeline):
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline, local_files_only=True)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    ids = pipe.tokenizer("a photo of a cat and a automobile").input_ids
    unk = pipe.tokenizer.unk_token_id
    assert ids[0] == pipe.tokenizer.bos_token_id and ids[-1] == pipe.tokenizer.eos_token_id
    assert "cat</w>" in pipe.tokenizer.tokenize("cat") and unk not in ids[1:-1]


@pytest.mark.parametrize("strategy", ["mixup", "single", "mixup-embed"])
def test_shapes_and_determinism(tiny_pipeline, strategy):
    ps = plans(strategy)
    out = make_gen(tiny_pipeline, strategy).generate(0, ps)
    assert out.images.dtype == torch.uint8 and out.images.device.type == "cpu"
    assert tuple(out.images.shape) == (4, SIZE, SIZE, 3)
    assert out.extra == [{}, {}, {}, {}]
    assert out.stats["images"] == 4 and out.stats["filler_images"] == 0 and out.stats["torch_threads"] == torch.get_num_threads()
    assert len({img.numpy().tobytes() for img in out.images}) == 4  # different seeds, different images
    assert out.images.float().std() > 5
    again = make_gen(tiny_pipeline, strategy).generate(0, ps)  # fresh pipeline, fresh torch.Generators
    assert torch.equal(out.images, again.images)


@pytest.mark.parametrize("strategy", ["mixup", "mixup-embed"])
def test_image_regenerates_alone(tiny_pipeline, strategy):
    gen = make_gen(tiny_pipeline, strategy)
    ps = plans(strategy, 0, 5)
    full = gen.generate(0, ps).images
    alone = gen.generate(0, [ps[3]])
    assert alone.stats["filler_images"] == 1  # its batch partner is re-planned and dropped
    assert torch.equal(alone.images[0], full[3])
    # shard boundaries not aligned with the batch groups do not change any byte
    split = torch.cat([gen.generate(0, ps[:3]).images, gen.generate(1, ps[3:]).images])
    assert torch.equal(split, full)


def test_batch_size_one_and_recipe(tiny_pipeline):
    gen1 = make_gen(tiny_pipeline, batch_size=1)
    ps = plans("mixup")
    out = gen1.generate(0, ps)
    assert out.stats["filler_images"] == 0
    assert torch.equal(gen1.generate(0, [ps[2]]).images[0], out.images[2])
    r1, r2 = gen1.recipe(), make_gen(tiny_pipeline, batch_size=2).recipe()
    assert r1["batch_size"] == 1 and r2["batch_size"] == 2  # the maths is not batch invariant
    assert r1["pipeline"] == "local-folder" and r1["revision"] is None
    assert "unet/diffusion_pytorch_model.safetensors" in r1["files"] and "model_index.json" in r1["files"]
    assert str(tiny_pipeline) not in repr(r1)  # content addressed, location independent
    assert r1["dtype"] == "float32" and r1["steps"] == 2 and r1["size"] == SIZE
    assert (Path(os.environ["XDG_CACHE_HOME"]) / "mixq-onnx" / "file-sha256.json").is_file()  # hash memo


def test_scheduler_swap_and_negative_prompt(tiny_pipeline):
    """Each option changes the images on its own; without guidance (1.0) there is no unconditional branch,
    so a negative prompt has nothing to replace and must change nothing."""
    ps = plans("single", 0, 2)
    base = make_gen(tiny_pipeline, "single").generate(0, ps).images
    gen = make_gen(tiny_pipeline, "single", scheduler="DDIMScheduler")
    out = gen.generate(0, ps).images
    assert type(gen.pipe.scheduler).__name__ == "DDIMScheduler" and gen.recipe()["scheduler"] == "DDIMScheduler"
    assert out.shape == base.shape and not torch.equal(out, base)
    neg = make_gen(tiny_pipeline, "single", negative_prompt="blurry")
    assert neg.recipe()["negative_prompt"] == "blurry"
    assert not torch.equal(neg.generate(0, ps).images, base)
    mps = plans("mixup-embed", 0, 2)
    nocfg = make_gen(tiny_pipeline, "mixup-embed", guidance=1.0).generate(0, mps).images
    assert nocfg.shape == (2, SIZE, SIZE, 3)
    assert torch.equal(make_gen(tiny_pipeline, "mixup-embed", guidance=1.0, negative_prompt="blurry")
                       .generate(0, mps).images, nocfg)


def test_offline_hub_id_fails_fast():
    t0 = time.perf_counter()
    with pytest.raises(MixqError, match="local folder") as err:
        make_gen("mixq-test/definitely-not-a-cached-pipeline")
    assert time.perf_counter() - t0 < 5
    assert "HF_HUB_OFFLINE" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("options, size, match", [
    ({"steps": 0}, SIZE, "steps"),
    ({"guidance": -1}, SIZE, "guidance"),
    ({"batch_size": 0}, SIZE, "batch-size"),
    ({"scheduler": "NoSuchScheduler"}, SIZE, "unknown scheduler"),
    ({"scheduler": "UNet2DConditionModel"}, SIZE, "unknown scheduler"),
    ({"render_size": 36}, SIZE, "multiple of 8"),
])
def test_validate_rejects(tiny_pipeline, options, size, match):
    with pytest.raises(MixqError, match=match):
        make_gen(tiny_pipeline, size=size, **options)


def test_validate_rejects_bad_folders(tmp_path):
    with pytest.raises(MixqError, match="model_index.json"):
        make_gen(tmp_path)
    with pytest.raises(MixqError, match="neither an existing local folder"):
        make_gen(tmp_path / "missing" / "pipeline")


def test_mixup_embed_weights_reach_the_embedding_and_the_images(tiny_pipeline):
    """The Dirichlet weights were only checked in the manifest; equal weights in `_embed` passed every test
    (review, 2026-11-30). The embedding is the weighted sum of the sub-prompts' embeddings, and other weights
    give other images."""
    import dataclasses

    gen = make_gen(tiny_pipeline, "mixup-embed", guidance=1.0)
    p = plans("mixup-embed", 0, 1)[0]
    base = gen.generate(0, [p]).images  # loads the pipeline
    subs = gen.pipe.encode_prompt(prompt=list(p.sub_prompts), device="cpu", num_images_per_prompt=1,
                                  do_classifier_free_guidance=False)[0]
    want = sum(float(w) * subs[i] for i, w in enumerate(p.weights)) / float(sum(p.weights))
    got = gen._embed([p], cfg=False)["prompt_embeds"][0]
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    other = dataclasses.replace(p, weights=tuple(reversed(p.weights)))
    assert p.weights != other.weights
    assert not torch.equal(base, gen.generate(0, [other]).images)


def test_a_pipeline_that_needs_an_input_image_is_one_line(tiny_pipeline, tmp_path):
    """An img2img pipeline folder failed inside diffusers at the first batch (review, 2026-11-30)."""
    import json
    import shutil

    other = tmp_path / "img2img"
    shutil.copytree(tiny_pipeline, other)
    idx = json.loads((other / "model_index.json").read_text())
    idx["_class_name"] = "StableDiffusionImg2ImgPipeline"
    (other / "model_index.json").write_text(json.dumps(idx))
    gen = make_gen(other)
    with pytest.raises(MixqError, match="starts from an input image"):
        gen.generate(0, plans("mixup", 0, 2))


def test_images_render_at_the_pipelines_size_and_are_resized_to_the_stored_one(tiny_pipeline):
    """A diffusion model asked for a 32-px image makes a 4x4 latent (review, 2026-11-30): the pipeline renders
    at its own size (the tiny one's: UNet sample 8 x VAE factor 8 = 64) and the stored image is that image
    resized to --size, as the models' preprocessing resizes."""
    ps = plans("mixup", 0, 2)
    gen = make_gen(tiny_pipeline)
    out = gen.generate(0, ps)
    assert out.stats["render_size"] == 64 and tuple(out.images.shape) == (2, SIZE, SIZE, 3)
    big = make_gen(tiny_pipeline, size=64).generate(0, ps)  # the same rendering, stored as rendered
    assert big.stats["render_size"] == 64 and tuple(big.images.shape) == (2, 64, 64, 3)
    want = torch.nn.functional.interpolate(big.images.permute(0, 3, 1, 2).float() / 255, size=(SIZE, SIZE),
                                           mode="bilinear", align_corners=False, antialias=True)
    want = (want * 255).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    assert (out.images.int() - want.int()).abs().max() <= 1  # resized from the float image, not its uint8
    small = make_gen(tiny_pipeline, render_size=32)  # the old behaviour, on request: recorded in the recipe
    assert small.recipe()["render_size"] == 32 and gen.recipe()["render_size"] is None
    assert small.generate(0, ps).stats["render_size"] == 32


def test_nan_pixels_are_counted_and_warned_not_silently_black(tiny_pipeline):
    logs: list[str] = []
    gen = make_gen(tiny_pipeline)
    gen.ctx.log = logs.append
    gen.setup()
    with torch.no_grad():
        gen.pipe.vae.decoder.conv_out.bias.fill_(float("nan"))  # a real NaN through the real decoder
    out = gen.generate(0, plans("mixup", 0, 2))
    assert out.stats["nonfinite_images"] == 2
    assert any(m.startswith("warning: diffusion: 2 of 2 images held NaN") for m in logs), logs
