"""`diffusion`: calibration images from a text-to-image diffusers pipeline (Stable Diffusion by default).

Determinism. Every image starts from noise drawn by its own CPU `torch.Generator(plan.seed)`, so the
noise never depends on its neighbours or the device. The network maths, however, is NOT batch
invariant: on CPU (oneDNN) the UNet and the VAE give ~1e-6 different floats for a sample run in a
batch of 4 than alone, enough to flip a uint8 pixel now and then, and cuDNN/cuBLAS behave alike.
So batches are fixed groups of `batch_size` consecutive global indices (group g = images
[g*bs, (g+1)*bs)), and `batch_size` is part of the recipe. When `generate` is handed only part of a
group (a shard edge, the tail, or one image to regenerate), the missing members are re-planned with
`plan_images` from the context and generated too, then dropped. Image i's bytes therefore depend only on
(recipe, i): not on sharding, process layout, `--num`, or which images were asked for together, and
`generate([plan_i])` regenerates image i byte for byte (same software, device and dtype).
`batch_size 1` means no filler work at all; with larger batches keep shard sizes multiples of it.
"""
from __future__ import annotations

import inspect
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ...errors import MixqError
from ...registry import PROMPT_STRATEGIES
from ...utils import atomic_write_json, hf_offline, sha256_file
from ..prompts import ImagePlan, plan_images
from .base import Generator, ShardOutput, register

DEFAULT_PIPELINE = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DEFAULTS: dict[str, Any] = {
    "pipeline": DEFAULT_PIPELINE,
    "steps": 25,
    "guidance": 7.5,
    "scheduler": None,
    "negative_prompt": None,
    "batch_size": 4,
    "revision": None,
    "render_size": None,  # None: the pipeline's own size (SD 1.5: 512), then resized to the stored --size
}
_SCHEDULER_EXAMPLES = "DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler"


def _hash_memo_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mixq-onnx" / "file-sha256.json"


def hash_folder(root: Path) -> dict[str, str]:
    """sha256 of every non-hidden file under `root` (symlinks followed), keyed by POSIX relative path.

    Hashes are memoised by (resolved path, size, mtime_ns) in ~/.cache/mixq-onnx/file-sha256.json so that
    re-runs on multi-GB weights cost a stat per file.
    """
    memo_path = _hash_memo_path()
    try:
        memo = json.loads(memo_path.read_text(encoding="utf-8"))
        if not isinstance(memo, dict):
            memo = {}
    except (OSError, ValueError):
        memo = {}
    out: dict[str, str] = {}
    changed = False
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            path = Path(dirpath) / name
            try:
                real = path.resolve()
                st = real.stat()
            except OSError as e:
                raise MixqError(f"cannot read pipeline file {path}: {e}") from None
            key = str(real)
            stamp = [st.st_size, st.st_mtime_ns]
            hit = memo.get(key)
            if isinstance(hit, list) and len(hit) == 3 and hit[:2] == stamp:
                digest = hit[2]
            else:
                digest = sha256_file(real)
                memo[key] = stamp + [digest]
                changed = True
            out[path.relative_to(root).as_posix()] = digest
    if changed:
        try:
            memo_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(memo_path, memo)
        except OSError:
            pass  # the memo is only a speed-up
    return out


def _scheduler_class(name: str):
    import diffusers

    cls = getattr(diffusers, name, None) if name.isidentifier() else None
    if cls is None or not isinstance(cls, type) or not issubclass(cls, diffusers.SchedulerMixin):
        raise MixqError(f"unknown scheduler {name!r}: give a diffusers scheduler class name such as "
                        f"{_SCHEDULER_EXAMPLES}")
    return cls


@register
class DiffusionGenerator(Generator):
    """Text-to-image diffusion; prompts come from the ImagePlans (mixup / single / mixup-embed)."""

    name = "diffusion"
    option_names = tuple(DEFAULTS)
    uses_prompts = True
    reads_text = True

    def __init__(self, ctx):
        super().__init__(ctx)
        opts = {**DEFAULTS, **{k: v for k, v in (ctx.options or {}).items() if v is not None}}
        self.pipeline_arg = str(opts["pipeline"])
        self.revision = opts["revision"] or None
        self.scheduler_name = opts["scheduler"] or None
        self.negative_prompt = opts["negative_prompt"] if opts["negative_prompt"] else None
        try:
            self.steps = int(opts["steps"])
            self.guidance = float(opts["guidance"])
            self.batch_size = int(opts["batch_size"])
            self.render_size = int(opts["render_size"]) if opts["render_size"] is not None else None
        except (TypeError, ValueError) as e:
            raise MixqError(f"bad diffusion option: {e}") from None
        self.dtype = torch.float16 if ctx.device.type == "cuda" else torch.float32
        self._source: dict[str, Any] | None = None  # resolved pipeline location
        self.pipe = None
        self.nonfinite_images = 0  # images of the current shard with NaN/inf pixels (stored as 0)

    # ------------------------------------------------------------------ checks and identity
    def validate(self) -> None:
        if self.steps < 1:
            raise MixqError(f"--steps must be at least 1, got {self.steps}")
        if not 0 <= self.guidance < float("inf"):
            raise MixqError(f"--guidance must be a finite number >= 0, got {self.guidance}")
        if self.batch_size < 1:
            raise MixqError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.ctx.size < 1:
            raise MixqError(f"--size must be positive, got {self.ctx.size}")
        if self.render_size is not None and (self.render_size < 8 or self.render_size % 8):
            raise MixqError(f"--render-size must be a positive multiple of 8, got {self.render_size}")
        if self.ctx.prompts.strategy not in PROMPT_STRATEGIES:
            raise MixqError(f"prompt strategy {self.ctx.prompts.strategy!r} is not supported by diffusion")
        if self.scheduler_name:
            _scheduler_class(self.scheduler_name)
        self._resolve()

    def _resolve(self) -> dict[str, Any]:
        """Find the pipeline: a local folder, or a hub id pinned to a commit. Never slow offline."""
        if self._source is not None:
            return self._source
        arg = self.pipeline_arg
        local = Path(arg).expanduser()
        if local.is_dir():
            if not (local / "model_index.json").is_file():
                raise MixqError(f"pipeline folder {local} has no model_index.json (not a diffusers pipeline)")
            self._source = {"kind": "local", "path": local.resolve()}
            return self._source
        if local.exists():
            raise MixqError(f"pipeline {arg} is a file: pass a diffusers pipeline folder or a hub id")
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

        if arg.startswith((".", "/", "~")) or arg.count("/") != 1:
            raise MixqError(f"pipeline {arg} is neither an existing local folder nor a Hugging Face repo id")

        def cached() -> Path | None:
            try:
                return Path(snapshot_download(arg, revision=self.revision, local_files_only=True))
            except HFValidationError as e:
                raise MixqError(f"pipeline {arg} is not a valid Hugging Face repo id: {e}") from None
            except (LocalEntryNotFoundError, FileNotFoundError):
                return None

        if hf_offline():
            snap = cached()
            if snap is None or not (snap / "model_index.json").is_file():
                at = f"@{self.revision}" if self.revision else ""
                raise MixqError(
                    f"pipeline {arg}{at} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set: "
                    "download it on a connected machine, or pass a local folder with "
                    "--pipeline path/to/pipeline")
            self._source = {"kind": "hub", "id": arg, "commit": snap.name, "path": snap}
            return self._source
        from huggingface_hub import HfApi
        from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

        try:
            commit = HfApi().model_info(arg, revision=self.revision, timeout=20).sha
        except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as e:
            raise MixqError(f"pipeline {arg} cannot be used from the Hugging Face hub: "
                            f"{str(e).splitlines()[0]}") from None
        except Exception as e:  # network trouble: fall back to what is cached
            snap = cached()
            if snap is None:
                raise MixqError(f"cannot reach the Hugging Face hub for pipeline {arg} and it is not cached "
                                f"({type(e).__name__}): pass a local folder with "
                                "--pipeline path/to/pipeline") from None
            self._source = {"kind": "hub", "id": arg, "commit": snap.name, "path": snap}
            return self._source
        self._source = {"kind": "hub", "id": arg, "commit": commit, "path": None}
        return self._source

    def recipe(self) -> dict[str, Any]:
        src = self._resolve()
        r: dict[str, Any] = {
            "generator": self.name,
            "steps": self.steps,
            "guidance": self.guidance,
            "scheduler": self.scheduler_name,
            "negative_prompt": self.negative_prompt,
            "size": self.ctx.size,
            "render_size": self.render_size,  # None: the pipeline's own (its files are in the recipe)
            "dtype": str(self.dtype).removeprefix("torch."),
            "batch_size": self.batch_size,  # the maths is not batch invariant (module docstring)
            "safety_checker": False,
            "noise": "cpu-generator-per-image",
        }
        if src["kind"] == "local":
            # content-addressed: the folder's location is not part of the identity
            r["pipeline"] = "local-folder"
            r["revision"] = None
            r["files"] = hash_folder(src["path"])
        else:
            r["pipeline"] = src["id"]
            r["revision"] = src["commit"]
        return r

    # ------------------------------------------------------------------ heavy work
    def setup(self) -> None:
        from diffusers import DiffusionPipeline

        src = self._resolve()
        offline = hf_offline() or src["path"] is not None
        where = str(src["path"]) if src["path"] is not None else src["id"]
        kwargs: dict[str, Any] = {"local_files_only": offline}
        if src["path"] is None:
            kwargs["revision"] = src["commit"]
        try:
            index = DiffusionPipeline.load_config(where, **kwargs)
            if isinstance(index, tuple):
                index = index[0]
            extra: dict[str, Any] = {}
            if "safety_checker" in index:  # black squares make bad calibration data
                extra["safety_checker"] = None
            if "requires_safety_checker" in index:
                extra["requires_safety_checker"] = False
            try:  # diffusers >= 0.36 renamed torch_dtype to dtype (the old name warns)
                from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401
                extra["dtype"] = self.dtype
            except ImportError:
                extra["torch_dtype"] = self.dtype
            t0 = time.perf_counter()
            from diffusers.utils import logging as dlog
            from transformers.utils import logging as tlog

            was_on, t_was_on = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
            dlog.disable_progress_bar()  # its per-component loading bar: calib's own bar says "loading the generator"
            tlog.disable_progress_bar()  # and the text encoder's "Loading weights" bar (shown even under -q)
            try:
                pipe = DiffusionPipeline.from_pretrained(where, trust_remote_code=False, **kwargs, **extra)
            finally:
                if was_on:
                    dlog.enable_progress_bar()
                if t_was_on:
                    tlog.enable_progress_bar()
        except MixqError:
            raise
        except Exception as e:
            raise MixqError(f"cannot load diffusion pipeline {self.pipeline_arg}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
        if "image" in inspect.signature(pipe.__call__).parameters:  # img2img, inpainting, upscaling: not ours
            raise MixqError(f"{self.pipeline_arg} is a {type(pipe).__name__}, which starts from an input image: calib "
                            "makes images from prompts alone and needs a text-to-image pipeline (such as "
                            "StableDiffusionPipeline)")
        if self.scheduler_name:
            pipe.scheduler = _scheduler_class(self.scheduler_name).from_config(pipe.scheduler.config)
        pipe = pipe.to(self.ctx.device)
        pipe.set_progress_bar_config(disable=True)
        # diffusers uses torch SDPA (AttnProcessor2_0) by default on torch >= 2: nothing to switch on.
        if self._embeds and not hasattr(pipe, "encode_prompt"):
            raise MixqError(f"{type(pipe).__name__} has no encode_prompt: {self.ctx.prompts.strategy} needs a "
                            "text-to-image pipeline such as Stable Diffusion; use --prompts mixup instead")
        self.pipe = pipe
        self.ctx.log(f"diffusion: loaded {type(pipe).__name__} ({self.pipeline_arg}) on {self.ctx.device} "
                     f"{str(self.dtype).removeprefix('torch.')}, scheduler {type(pipe.scheduler).__name__}, "
                     f"in {time.perf_counter() - t0:.1f}s")

    def _group_plans(self, group: int, given: dict[int, ImagePlan]) -> list[ImagePlan]:
        lo, hi = group * self.batch_size, (group + 1) * self.batch_size
        missing = [i for i in range(lo, hi) if i not in given]
        filled: dict[int, ImagePlan] = {}
        if missing:
            ctx = self.ctx
            filled = {p.index: p for p in plan_images(ctx.prompts, ctx.vocab, ctx.seed, lo, hi)}
        return [given.get(i) or filled[i] for i in range(lo, hi)]

    @property
    def _embeds(self) -> bool:
        """The prompt strategy conditions on mixed text embeddings (mixup-embed), not on prompt strings."""
        return PROMPT_STRATEGIES.lookup(self.ctx.prompts.strategy).embeds

    @torch.no_grad()
    def _embed(self, plans: list[ImagePlan], cfg: bool) -> dict[str, torch.Tensor]:
        """mixup-embed: weighted sum of the text embeddings of each plan's sub-prompts."""
        pipe = self.pipe
        texts: list[str] = []
        spans: list[tuple[int, int, tuple[float, ...]]] = []
        for p in plans:
            subs = p.sub_prompts or (p.prompt or "",)
            weights = p.weights if p.sub_prompts else (1.0,)
            spans.append((len(texts), len(subs), tuple(weights)))
            texts.extend(subs)
        neg = [self.negative_prompt] * len(texts) if (cfg and self.negative_prompt) else None
        out = pipe.encode_prompt(prompt=texts, device=pipe._execution_device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=cfg, negative_prompt=neg)
        if len(out) == 2:
            names = ("prompt_embeds", "negative_prompt_embeds")
        elif len(out) == 4:  # SDXL-style: (embeds, negative, pooled, negative pooled)
            names = ("prompt_embeds", "negative_prompt_embeds", "pooled_prompt_embeds",
                     "negative_pooled_prompt_embeds")
        else:
            raise MixqError(f"{type(pipe).__name__}.encode_prompt returned {len(out)} tensors: mixup-embed "
                            "supports Stable Diffusion / SDXL style pipelines")
        result: dict[str, torch.Tensor] = {}
        for name, tensor in zip(names, out):
            if tensor is None or (name.startswith("negative") and not cfg):
                continue
            rows = []
            for start, count, weights in spans:
                block = tensor[start:start + count]
                if name.startswith("negative"):
                    rows.append(block[0])  # the same negative for every sub-prompt
                else:
                    w = torch.tensor(weights, dtype=torch.float32, device=block.device)
                    w = w.view(-1, *([1] * (block.dim() - 1)))
                    rows.append((block.float() * w).sum(0).to(block.dtype))
            result[name] = torch.stack(rows)
        return result

    def rendered_size(self) -> int:
        """Side length the pipeline renders at: --render-size, else the pipeline's own (the UNet's sample size
        times the VAE's scale factor: 512 for SD 1.5, 1024 for SDXL). A diffusion model asked for a 32-px image
        makes a 4x4 latent, not a picture; the stored --size is a resize of the rendered image."""
        if self.render_size is not None:
            return self.render_size
        pipe = self.pipe
        sample = getattr(getattr(getattr(pipe, "unet", None), "config", None), "sample_size", None)
        scale = getattr(pipe, "vae_scale_factor", None)
        if isinstance(sample, (tuple, list)):
            sample = sample[0]
        if not isinstance(sample, int) or not isinstance(scale, int):
            raise MixqError(f"{type(pipe).__name__} does not say its image size (unet.config.sample_size, "
                            "vae_scale_factor): pass --render-size")
        return int(sample) * int(scale)

    @torch.no_grad()
    def _run_group(self, plans: list[ImagePlan], on_step: Callable[[float], None] | None = None) -> torch.Tensor:
        """One fixed batch through the pipeline at `rendered_size`, resized to the stored size (antialiased,
        as the models' preprocessing resizes); `on_step(fraction)` after each denoising step (a batch of 25
        steps takes minutes on a CPU) where the pipeline takes `callback_on_step_end`."""
        pipe, size = self.pipe, self.ctx.size
        render = self.rendered_size()
        cfg = self.guidance > 1.0
        gens = [torch.Generator("cpu").manual_seed(int(p.seed)) for p in plans]
        kwargs: dict[str, Any] = dict(height=render, width=render, num_inference_steps=self.steps,
                                      guidance_scale=self.guidance, generator=gens, output_type="pt")
        if on_step is not None and "callback_on_step_end" in inspect.signature(pipe.__call__).parameters:
            def step_end(_pipe: Any, i: int, _t: Any, callback_kwargs: dict[str, Any]) -> dict[str, Any]:
                # the scheduler's own count: some (PNDM) run more timesteps than num_inference_steps
                ts = getattr(getattr(_pipe, "scheduler", None), "timesteps", None)
                n = len(ts) if ts is not None and len(ts) else self.steps
                on_step(min(1.0, (i + 1) / max(1, n)))
                return callback_kwargs  # unchanged: the latents go on as they are

            kwargs["callback_on_step_end"] = step_end
        if self._embeds:
            kwargs.update(self._embed(plans, cfg))
        else:
            kwargs["prompt"] = [p.prompt or "" for p in plans]
            if cfg and self.negative_prompt:
                kwargs["negative_prompt"] = [self.negative_prompt] * len(plans)
        images = pipe(**kwargs).images  # float [n, 3, H, W] in [0, 1]
        if not isinstance(images, torch.Tensor):
            images = torch.as_tensor(images).permute(0, 3, 1, 2)
        images = images.float()
        bad = int((~torch.isfinite(images)).flatten(1).any(1).sum())
        if bad:  # an overflowing fp16 UNet or VAE: stored black, so say so
            self.nonfinite_images += bad
            self.ctx.log(f"warning: diffusion: {bad} of {len(plans)} images held NaN or inf pixels (stored as 0); "
                         "fp16 overflow? try --device cpu or another --scheduler")
        images = torch.nan_to_num(images, nan=0.0, posinf=1.0, neginf=0.0)
        if tuple(images.shape[-2:]) != (size, size):
            images = torch.nn.functional.interpolate(images.clamp(0, 1), size=(size, size), mode="bilinear",
                                                     align_corners=False, antialias=True)
        out = (images * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu()
        if tuple(out.shape) != (len(plans), size, size, 3):
            raise MixqError(f"pipeline returned images of shape {tuple(out.shape)}, expected "
                            f"{(len(plans), size, size, 3)}")
        return out

    def generate(self, shard_index: int, plans: list[ImagePlan]) -> ShardOutput:
        if self.pipe is None:
            self.setup()
        t0 = time.perf_counter()
        self.nonfinite_images = 0
        given = {p.index: p for p in plans}
        made: dict[int, torch.Tensor] = {}
        computed = 0
        groups = sorted({p.index // self.batch_size for p in plans})
        for k, group in enumerate(groups):
            members = self._group_plans(group, given)
            imgs = self._run_group(members, lambda f, k=k: self.ctx.shard_progress((k + f) / len(groups)))
            self.ctx.shard_progress((k + 1) / len(groups))
            computed += len(members)
            for p, img in zip(members, imgs):
                if p.index in given:
                    made[p.index] = img
        images = torch.stack([made[p.index] for p in plans]) if plans else torch.zeros(
            (0, self.ctx.size, self.ctx.size, 3), dtype=torch.uint8)
        seconds = time.perf_counter() - t0
        stats = {
            "seconds": round(seconds, 3),
            "images": len(plans),
            "filler_images": computed - len(plans),
            "images_per_s": round(len(plans) / seconds, 3) if seconds > 0 else None,
            "torch_threads": torch.get_num_threads(),  # the denoising sums, hence the pixels, depend on it on a CPU
            "render_size": self.rendered_size(),
            "nonfinite_images": self.nonfinite_images,  # counted over the whole batch groups run, fillers too
        }
        return ShardOutput(images=images, extra=[{} for _ in plans], stats=stats)
