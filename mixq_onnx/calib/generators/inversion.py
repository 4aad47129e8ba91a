"""Data-free calibration images by BatchNorm-statistics inversion (Genie-D / ZeroQ style).

Per shard, a batch of latent vectors and a small convolutional generator are learned together so
that the images they produce, fed through the frozen target network, reproduce every
BatchNorm2d layer's running statistics:

    L_bn = sum over BN layers of ||mu_batch - running_mean||_2 + ||sigma_batch - sqrt(running_var + eps)||_2

with mu/sigma the per-channel batch mean and standard deviation of the layer's *input*. With class
targets (prompt strategy mixup / single / mixup-embed) a cross-entropy against each image's soft
label (its plan's classes and weights) is added with weight `ce_weight`; strategy "none" is pure
BN matching.

Against overfitting to pixel positions the input is randomly shifted (reflect-pad + crop by up to
`jitter` pixels) and flipped every step, and every strided convolution of the model is a "swing
convolution" (Genie): its input is reflect-padded by stride-1 pixels and cropped back at a random
offset, so the subsampling grid moves from step to step.

The generator ends in tanh mapped onto 0..1 pixel intensity and then normalised with the model's
own `Preprocessing`, so every image lies in the valid 0..255 range by construction.

All randomness (latents, generator weights, jitter, flips, swing offsets) comes from one local
`torch.Generator` seeded from (seed, shard_index, first index, shard length): the same shard
computed twice gives byte-identical images on the same machine and torch thread count. A
different `torch.get_num_threads()` changes the floating-point reduction order of the CPU kernels
and, over hundreds of steps, some pixels (recorded per shard as `torch_threads`). On CUDA the
shard runs with cuDNN deterministic / no benchmark (restored afterwards).
"""
from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from ...errors import MixqError
from ...models import get_preprocessing
from ...threads import tick
from ...utils import model_device
from ..prompts import ImagePlan
from .base import Generator, ShardOutput, register

DEFAULTS: dict[str, Any] = {
    "iters": 100,  # optimisation steps per shard (512 images x 100 beat 256 x 200 at equal cost: docs section mainjob)
    "lr": 0.01,  # Adam learning rate of the generator's weights
    "latent_lr": 0.01,  # Adam learning rate of the latent vectors
    "lr_min_ratio": 0.05,  # cosine decay from lr to lr * lr_min_ratio
    "ce_weight": 0.5,  # weight of the soft-label cross-entropy (class-targeted strategies only)
    "latent_dim": 128,
    "gen_channels": 32,  # generator width (its first block); the second block has half
    "jitter": 0,  # random shift of the whole input (reflect-pad + crop), in pixels; 0 = off
    "flip": True,  # random horizontal flips during synthesis
    "swing": True,  # Genie swing convolution on every strided conv of the model
}

_SEED_TAG = 0x1A7E75


def _shard_seed(seed: int, shard_index: int, first: int, count: int) -> int:
    state = np.random.SeedSequence([int(seed), int(shard_index), int(first), int(count), _SEED_TAG])
    return int(state.generate_state(1, dtype=np.uint64)[0]) & ((1 << 63) - 1)


def bn_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """BatchNorm2d layers with running statistics (subclasses such as timm's BatchNormAct2d included)."""
    return [
        m for m in model.modules()
        if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
    ]


class _Synth(nn.Module):
    """latent -> linear -> [upsample x2, conv3x3, BN, LeakyReLU] x2 -> conv3x3 -> tanh (0..1 pixels).

    BatchNorms use batch statistics only (no running buffers), so the output depends on the
    whole shard, which is one optimisation batch anyway.
    """

    def __init__(self, latent_dim: int, ch: int, out_hw: tuple[int, int]):
        super().__init__()
        self.out_hw = out_hw
        self.h0, self.w0 = max(1, math.ceil(out_hw[0] / 4)), max(1, math.ceil(out_hw[1] / 4))
        c2 = max(8, ch // 2)
        self.ch = ch
        self.fc = nn.Linear(latent_dim, ch * self.h0 * self.w0)
        self.bn0 = nn.BatchNorm2d(ch, track_running_stats=False)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(ch, track_running_stats=False)
        self.conv2 = nn.Conv2d(ch, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2, track_running_stats=False)
        self.conv3 = nn.Conv2d(c2, 3, 3, padding=1)

    @torch.no_grad()
    def init_(self, g: torch.Generator) -> None:
        """torch's default fan-in uniform init, drawn from the local generator."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                bound = 1.0 / math.sqrt(fan_in)
                m.weight.uniform_(-bound, bound, generator=g)
                if m.bias is not None:
                    m.bias.uniform_(-bound, bound, generator=g)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.fc(z).view(z.shape[0], self.ch, self.h0, self.w0)
        x = self.bn0(x)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
        x = self.conv3(x)
        if tuple(x.shape[-2:]) != self.out_hw:
            x = F.interpolate(x, size=self.out_hw, mode="bilinear", align_corners=False)
        return (torch.tanh(x) + 1.0) * 0.5


def _shift(x: torch.Tensor, pad: int, g: torch.Generator) -> torch.Tensor:
    """Reflect-pad by `pad` and crop back to the original size at a random offset (one per batch)."""
    if pad <= 0:
        return x
    h, w = x.shape[-2:]
    p = min(pad, h - 1, w - 1)
    if p <= 0:
        return x
    dy, dx = (int(v) for v in torch.randint(0, 2 * p + 1, (2,), generator=g))
    xp = F.pad(x, (p, p, p, p), mode="reflect")
    return xp[..., dy:dy + h, dx:dx + w]


class _Hooks:
    """BN-input statistics loss (forward hooks) and swing convolution (forward pre-hooks)."""

    def __init__(self, model: nn.Module, swing: bool, g: torch.Generator):
        self.layers = bn_layers(model)
        self.losses: list[torch.Tensor] = []
        self.swing_on = False
        self.g = g
        self.handles = [m.register_forward_hook(self._bn_hook) for m in self.layers]
        self.n_swing = 0
        if swing:
            for m in model.modules():
                if isinstance(m, nn.Conv2d) and max(m.stride) > 1:
                    self.handles.append(m.register_forward_pre_hook(self._swing_hook))
                    self.n_swing += 1

    def _bn_hook(self, module: nn.BatchNorm2d, inputs: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = inputs[0]
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        std = torch.sqrt(var + module.eps)
        target_std = torch.sqrt(module.running_var + module.eps)
        self.losses.append(torch.linalg.vector_norm(mean - module.running_mean)
                           + torch.linalg.vector_norm(std - target_std))

    def _swing_hook(self, module: nn.Conv2d, inputs: tuple[torch.Tensor, ...]) -> Any:
        if not self.swing_on:
            return None
        pad = max(module.stride) - 1
        return (_shift(inputs[0], pad, self.g),) + tuple(inputs[1:])

    def take(self) -> torch.Tensor:
        loss = torch.stack(self.losses).sum()
        self.losses = []
        return loss

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@register
class InversionGenerator(Generator):
    """Genie-D style synthesis: latents + generator optimised to match the model's BN statistics."""

    name = "inversion"
    option_names = tuple(DEFAULTS)
    uses_prompts = True
    needs_model = True

    @classmethod
    def default_shard_size(cls, size: int) -> int:
        """A shard is one optimisation batch whose BN statistics must match the running ones: 256 images
        estimate them better than 64 (ResNet-20 qdrop W4A4: 80.62 against 79.38 top-1 at the same time per
        image; docs/benchmarks.md, section mainjob). Large inputs get 32 to bound activation memory."""
        return 256 if size <= 64 else 32

    # ------------------------------------------------------------------ options
    def opt(self, key: str) -> Any:
        v = self.ctx.options.get(key)
        return DEFAULTS[key] if v is None else v

    def _options(self) -> dict[str, Any]:
        o = {k: self.opt(k) for k in DEFAULTS}
        try:
            o["iters"] = int(o["iters"])
            o["latent_dim"] = int(o["latent_dim"])
            o["gen_channels"] = int(o["gen_channels"])
            o["jitter"] = int(o["jitter"])
            for k in ("lr", "latent_lr", "lr_min_ratio", "ce_weight"):
                o[k] = float(o[k])
            for k in ("flip", "swing"):
                v = o[k]
                o[k] = v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")
        except (TypeError, ValueError) as e:
            raise MixqError(f"bad inversion option: {e}") from None
        bad = [k for k in ("lr", "latent_lr", "lr_min_ratio", "ce_weight") if not math.isfinite(o[k])]
        if bad:
            raise MixqError(f"inversion {', '.join(bad)} must be finite numbers")
        if o["iters"] < 0:
            raise MixqError(f"inversion iters must be >= 0, got {o['iters']}")
        if o["lr"] <= 0 or o["latent_lr"] < 0:
            raise MixqError("inversion lr must be positive (latent_lr >= 0)")
        if not 0.0 < o["lr_min_ratio"] <= 1.0:
            raise MixqError(f"inversion lr_min_ratio must be in (0, 1], got {o['lr_min_ratio']}")
        if o["ce_weight"] < 0:
            raise MixqError(f"inversion ce_weight must be >= 0, got {o['ce_weight']}")
        if o["latent_dim"] < 1 or o["gen_channels"] < 8 or o["jitter"] < 0:
            raise MixqError("inversion latent_dim must be >= 1, gen_channels >= 8, jitter >= 0")
        return o

    def _uses_ce(self, o: dict[str, Any]) -> bool:
        return self.ctx.prompts.strategy != "none" and self.ctx.vocab is not None and o["ce_weight"] > 0

    # ------------------------------------------------------------------ interface
    def validate(self) -> None:
        model = self.ctx.model
        if model is None:
            raise MixqError("--generator inversion needs --model")
        if not bn_layers(model):
            raise MixqError(
                "--generator inversion needs a model with BatchNorm2d layers (it inverts their running "
                f"statistics); {type(model).__name__} has none"
            )
        if get_preprocessing(model).input_size[0] != 3:
            raise MixqError(f"--generator inversion synthesises RGB images and this model takes "
                            f"{get_preprocessing(model).input_size[0]}-channel input: use --generator real or noise")
        o = self._options()
        if self._uses_ce(o):
            pre = get_preprocessing(model)
            dev = model_device(model, self.ctx.device)
            was_training = model.training
            model.eval()
            try:
                with torch.no_grad():
                    out = model(torch.zeros(1, *pre.input_size, device=dev))
            except Exception as e:  # noqa: BLE001
                raise MixqError(f"model forward failed on a {tuple(pre.input_size)} input: {e}") from None
            finally:
                model.train(was_training)
            if not isinstance(out, torch.Tensor) or out.ndim != 2:
                raise MixqError("--generator inversion with class targets needs a classifier returning [N, classes] logits")
            assert self.ctx.vocab is not None
            if len(self.ctx.vocab) > out.shape[1]:
                raise MixqError(
                    f"class vocabulary {self.ctx.vocab.source} has {len(self.ctx.vocab)} classes but the model "
                    f"outputs {out.shape[1]} logits"
                )

    def recipe(self) -> dict[str, Any]:
        o = self._options()
        pre = get_preprocessing(self.ctx.model) if self.ctx.model is not None else None
        return {
            "name": self.name,
            "method": "genie-d: latents + generator, BN-input statistics loss (L2 of mean and std)",
            "iters": o["iters"],
            "lr": o["lr"],
            "latent_lr": o["latent_lr"],
            "schedule": {"kind": "cosine", "min_ratio": o["lr_min_ratio"]},
            "optimizer": "adam",
            "ce_weight": o["ce_weight"] if self._uses_ce(o) else 0.0,
            "ce_target": "plan soft labels" if self._uses_ce(o) else None,
            "latent_dim": o["latent_dim"],
            "gen_channels": o["gen_channels"],
            "swing": {"conv": o["swing"], "jitter": o["jitter"], "flip": o["flip"]},
            "input_size": list(pre.input_size) if pre is not None else None,
            "version": 1,
        }

    # ------------------------------------------------------------------ synthesis
    def _targets(self, plans: list[ImagePlan], n_logits: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        q = torch.zeros(len(plans), n_logits, device=device)
        has = torch.zeros(len(plans), dtype=torch.bool, device=device)
        for i, p in enumerate(plans):
            if not p.classes:
                continue
            tot = float(sum(p.weights)) or 1.0
            for c, w in zip(p.classes, p.weights):
                if not 0 <= c < n_logits:
                    raise MixqError(f"plan class {c} is outside the model's {n_logits} logits")
                q[i, c] += float(w) / tot
            has[i] = True
        return q, has

    def generate(self, shard_index: int, plans: list[ImagePlan]) -> ShardOutput:
        t0 = time.perf_counter()
        model = self.ctx.model
        if model is None:
            raise MixqError("--generator inversion needs --model")
        o = self._options()
        torch.set_flush_denormal(True)
        pre = get_preprocessing(model)
        dev = model_device(model, self.ctx.device)
        n = len(plans)
        if n == 0:
            s = self.ctx.size
            return ShardOutput(torch.zeros(0, s, s, 3, dtype=torch.uint8), [], {"iters": 0})
        hw = (int(pre.input_size[1]), int(pre.input_size[2]))
        mean = torch.tensor(pre.mean, dtype=torch.float32, device=dev).view(1, -1, 1, 1)
        std = torch.tensor(pre.std, dtype=torch.float32, device=dev).view(1, -1, 1, 1)

        shard_seed = _shard_seed(self.ctx.seed, shard_index, plans[0].index, n)
        g = torch.Generator().manual_seed(shard_seed)
        synth = _Synth(o["latent_dim"], o["gen_channels"], hw)
        synth.init_(g)
        synth.to(dev).train()
        z = torch.randn(n, o["latent_dim"], generator=g).to(dev).requires_grad_(True)
        params = list(synth.parameters())
        groups = [{"params": params, "lr": o["lr"], "base": o["lr"]}]
        if o["latent_lr"] > 0:
            groups.append({"params": [z], "lr": o["latent_lr"], "base": o["latent_lr"]})
        opt = torch.optim.Adam(groups, betas=(0.5, 0.999))
        train_vars = params + ([z] if o["latent_lr"] > 0 else [])

        use_ce = self._uses_ce(o)
        was_training = model.training
        model.eval()
        cudnn_flags = None
        if dev.type == "cuda":  # cuDNN autotuning and nondeterministic kernels break reproducibility
            cudnn_flags = (torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
            torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
        hooks = _Hooks(model, o["swing"], g)
        q = has = None
        ce_first = ce_last = None
        loss_first = loss_last = None
        try:
            def render() -> torch.Tensor:  # model-space input
                return (synth(z) - mean) / std

            with torch.no_grad():
                x0 = render()
                start_imgs = pre.denormalize(x0)
            iters = o["iters"]
            for it in range(iters):
                tick()  # follow the machine's load (auto thread mode only)
                frac = it / max(1, iters)
                scale = o["lr_min_ratio"] + (1 - o["lr_min_ratio"]) * 0.5 * (1 + math.cos(math.pi * frac))
                for grp in opt.param_groups:
                    grp["lr"] = grp["base"] * scale
                x = render()
                x = _shift(x, o["jitter"], g)
                if o["flip"] and bool(torch.rand(1, generator=g) < 0.5):
                    # One flip for the whole batch: per-image flips would only constrain the
                    # statistics of half-flipped batches, which unflipped images need not match.
                    x = x.flip(-1)
                hooks.swing_on = True
                logits = model(x)
                hooks.swing_on = False
                bn = hooks.take()
                loss = bn
                ce_val = None
                if use_ce:
                    if q is None:
                        q, has = self._targets(plans, logits.shape[1], dev)
                    if bool(has.any()):
                        ce = -(q * F.log_softmax(logits, dim=1)).sum(1)[has].mean()
                        loss = loss + o["ce_weight"] * ce
                        ce_val = float(ce.detach())
                grads = torch.autograd.grad(loss, train_vars)
                for v, gr in zip(train_vars, grads):
                    v.grad = gr
                opt.step()
                opt.zero_grad(set_to_none=True)
                if it == 0:
                    loss_first, ce_first = float(bn.detach()), ce_val
                loss_last, ce_last = float(bn.detach()), ce_val
                self.ctx.shard_progress((it + 1) / iters)

            with torch.no_grad():
                x = render()
                if self.ctx.size != hw[0] or self.ctx.size != hw[1]:
                    x = F.interpolate(x, size=(self.ctx.size, self.ctx.size), mode="bilinear",
                                      align_corners=False, antialias=True)
                images = pre.denormalize(x).cpu()
                # Honest numbers: measured on the stored uint8 images as the quantizer will see them.
                bn_start, _ = self._evaluate(model, hooks, pre, start_imgs, dev)
                bn_end, logits = self._evaluate(model, hooks, pre, images, dev)
        finally:
            hooks.remove()
            model.train(was_training)
            if cudnn_flags is not None:
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = cudnn_flags

        prob = F.softmax(logits.float(), dim=1)
        pmax, pred = prob.max(1)
        extra = [{"fp_pred": int(c), "fp_prob": round(float(p), 6)} for c, p in zip(pred, pmax)]
        stats: dict[str, Any] = {
            "bn_loss_start": round(bn_start, 6),
            "bn_loss_end": round(bn_end, 6),
            "bn_loss_first_iter": None if loss_first is None else round(loss_first, 6),
            "bn_loss_last_iter": None if loss_last is None else round(loss_last, 6),
            # what seeds the whole shard (the images are learned together): the per-image `seed` of the
            # manifest's records is the plan's and does not regenerate an image alone here
            "seed": shard_seed,
            "iters": o["iters"],
            "bn_layers": len(hooks.layers),
            "swing_convs": hooks.n_swing,
            "torch_threads": torch.get_num_threads(),  # CPU results are reproducible per thread count
            "seconds": round(time.perf_counter() - t0, 3),
        }
        if use_ce and q is not None and has is not None and bool(has.any()):
            ce_end = -(q.cpu() * F.log_softmax(logits.float(), dim=1)).sum(1)[has.cpu()].mean()
            stats["ce_first_iter"] = None if ce_first is None else round(ce_first, 6)
            stats["ce_last_iter"] = None if ce_last is None else round(ce_last, 6)
            stats["ce_end"] = round(float(ce_end), 6)
        return ShardOutput(images, extra, stats)

    @staticmethod
    def _evaluate(model: nn.Module, hooks: _Hooks, pre: Any, images: torch.Tensor,
                  dev: torch.device) -> tuple[float, torch.Tensor]:
        """BN loss (whole batch, no jitter or swing) and logits of uint8 images."""
        hooks.swing_on = False
        hooks.losses = []
        logits = model(pre(images).to(dev))
        return float(hooks.take()), logits.detach().cpu()
