"""Prompt strategies: which classes each synthetic image shows, with which words and weights.

The plan for image `i` depends only on (seed, i), never on `--num` or the process layout, so
a cache can be resumed or split across ranks and still yield the same images.

The strategies are the registry `mixq_onnx.registry.PROMPT_STRATEGIES` (light, so the CLI lists them without
importing numpy); each entry names its planner here (`plan_mixup`, `plan_single`, `plan_mixup_embed`,
`plan_unconditioned`). A new strategy is a planner `(cfg, vocab, seed, start, stop) -> list[ImagePlan]`
plus one `register_prompt_strategy(PromptStrategy(...))` line there.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from ..errors import MixqError
from ..registry import PROMPT_STRATEGIES, resolve
from .classes import ClassVocab

#: GenQ's adjective list for single-class prompts.
ADJECTIVES = (
    "realistic", "close-up", "bright", "dark", "blurry", "detailed", "colorful", "small", "large",
    "natural", "outdoor", "indoor", "cropped", "centered", "sharp", "cluttered",
)

DEFAULT_TEMPLATE = "a photo of a {} and a {}"
SUB_PROMPT = "a photo of a {}"  # mixup-embed: one single-class prompt per mixed class
SINGLE_TEMPLATE: str = PROMPT_STRATEGIES["single"].default_template  # "a photo of a {adjective} {cls}"


@dataclass(frozen=True)
class PromptConfig:
    strategy: str = "mixup"
    k: int = 2
    template: str | None = None  # None: "a photo of a {} and a {}" generalised for k
    alpha: float = 1.0  # Dirichlet(alpha) mixing weights of `embeds` strategies (mixup-embed), 1.0 for others
    use_gloss: bool = False

    def validate(self, num_classes: int) -> None:
        spec = PROMPT_STRATEGIES.lookup(self.strategy)
        if spec.mixes:
            if self.k < 2:
                raise MixqError(f"--k must be at least 2 for {self.strategy} prompts, got {self.k}")
            if self.k > num_classes:
                raise MixqError(f"--k {self.k} exceeds the number of classes ({num_classes})")
        if not 0 < self.alpha < float("inf"):
            raise MixqError(f"--alpha must be a positive finite number, got {self.alpha}")
        if self.alpha != 1.0 and not spec.embeds:  # it would change the cache's hash and nothing else
            raise MixqError(f"--alpha sets the Dirichlet mixing weights of --prompts mixup-embed; --prompts "
                            f"{self.strategy} does not draw any (drop --alpha, or use mixup-embed)")
        if self.k != 2 and not spec.mixes:  # it would change the cache's hash and nothing else
            raise MixqError(f"--k sets the classes per image of a mixing strategy; --prompts {self.strategy} "
                            "does not mix (drop --k)")
        if self.template is not None:
            self._check_template(spec)

    def _check_template(self, spec: Any) -> None:
        """A template the strategy reads, that formats: a bad one failed with a KeyError or IndexError after the
        cache folder existed."""
        if spec.template_slots:
            if self.template.count("{}") != self.k:
                raise MixqError(f"--template needs exactly {self.k} '{{}}' placeholders for k={self.k}")
            try:
                self.template.format(*(["x"] * self.k))
            except (KeyError, IndexError, ValueError) as e:
                raise MixqError(f"--template {self.template!r} does not format with {self.k} class names "
                                f"({type(e).__name__}: {e}); use '{{}}' slots only") from None
        elif spec.default_template is not None:  # single: '{adjective}' and '{cls}'
            if "{cls}" not in self.template:
                raise MixqError(f"--template {self.template!r} for --prompts {self.strategy} needs a '{{cls}}' slot "
                                "(and may use '{adjective}'): without it no prompt names its class")
            try:
                self.template.format(adjective="x", cls="y")
            except (KeyError, IndexError, ValueError) as e:
                raise MixqError(f"--template {self.template!r} does not format with '{{adjective}}' and '{{cls}}' "
                                f"({type(e).__name__}: {e})") from None
        else:
            raise MixqError(f"--prompts {self.strategy} writes no templated prompt: drop --template")

    def mixup_template(self) -> str:
        if self.template:
            return self.template
        if self.k == 2:
            return DEFAULT_TEMPLATE
        return "a photo of " + ", ".join(["a {}"] * (self.k - 1)) + " and a {}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        spec = PROMPT_STRATEGIES.get(self.strategy)
        if spec is not None and spec.embeds:  # mixup-embed: its sub-prompts' template, the one it uses
            d["template"] = SUB_PROMPT
        else:
            d["template"] = self.mixup_template() if spec is not None and spec.mixes else (
                self.template or (spec.default_template if spec is not None else None))
        return d


@dataclass(frozen=True)
class ImagePlan:
    """What one image should show; recorded verbatim in the manifest."""

    index: int
    seed: int
    classes: tuple[int, ...]
    weights: tuple[float, ...]
    prompt: str | None
    sub_prompts: tuple[str, ...] = ()

    def record(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "index": self.index,
            "seed": self.seed,
            "classes": list(self.classes),
            "weights": [round(w, 6) for w in self.weights],
            "prompt": self.prompt,
        }
        if self.sub_prompts:
            d["sub_prompts"] = list(self.sub_prompts)
        return d


def image_seed(seed: int, index: int) -> int:
    """Per-image seed: the generators that draw each image from its own seed (diffusion, noise) regenerate image
    `index` alone with it. BN inversion learns a shard's images together from one seed (its shard stats'
    `seed`), and real images are a seeded permutation's head: there it identifies the plan only."""
    return int(np.random.SeedSequence([seed, index]).generate_state(1, dtype=np.uint32)[0])


def _round_classes(seed: int, rnd: int, n_cls: int) -> np.ndarray:
    return np.random.default_rng([seed, 0x5EED, rnd]).permutation(n_cls)


def _class_stream(seed: int, n_cls: int, start: int, count: int) -> list[int]:
    """Entries [start, start+count) of an endless stream of per-round class permutations."""
    out: list[int] = []
    pos = start
    while len(out) < count:
        rnd, off = divmod(pos, n_cls)
        perm = _round_classes(seed, rnd, n_cls)
        take = min(n_cls - off, count - len(out))
        out.extend(int(c) for c in perm[off:off + take])
        pos += take
    return out


def _mixup_classes(seed: int, n_cls: int, k: int, index: int) -> tuple[int, ...]:
    """k distinct classes; rounds of floor(n/k) images each draw from one permutation without
    replacement. When k divides the class count every class appears equally often over whole rounds; otherwise
    each round leaves n mod k random classes out, so the counts are balanced in expectation only (CIFAR-10 at
    k = 3: 892 to 911 per class over 3,000 images)."""
    per_round = n_cls // k
    rnd, slot = divmod(index, per_round)
    perm = _round_classes(seed, rnd, n_cls)
    return tuple(int(c) for c in perm[slot * k:(slot + 1) * k])


def plan_images(
    cfg: PromptConfig, vocab: ClassVocab | None, seed: int, start: int, stop: int
) -> list[ImagePlan]:
    """Plans for image indices [start, stop), from the strategy's planner."""
    spec = PROMPT_STRATEGIES.lookup(cfg.strategy)
    if not spec.conditioned or vocab is None:
        return plan_unconditioned(cfg, vocab, seed, start, stop)
    return list(resolve(spec.plan)(cfg, vocab, seed, start, stop))


def _plan_rng(seed: int, index: int) -> np.random.Generator:
    """Per-image random choices of a planner (adjectives, mixing weights)."""
    return np.random.default_rng([seed, 0xA11, index])


def plan_unconditioned(cfg: PromptConfig, vocab: ClassVocab | None, seed: int, start: int, stop: int) -> list[ImagePlan]:
    """`none`: no classes, no prompt."""
    return [ImagePlan(i, image_seed(seed, i), (), (), None) for i in range(start, stop)]


def plan_single(cfg: PromptConfig, vocab: ClassVocab, seed: int, start: int, stop: int) -> list[ImagePlan]:
    """`single`: one class per image (every class equally often), GenQ's 'a photo of a {adjective} {class}'."""
    singles = _class_stream(seed, len(vocab), start, stop - start)
    tmpl = cfg.template or SINGLE_TEMPLATE
    plans: list[ImagePlan] = []
    for c, i in zip(singles, range(start, stop)):
        adj = ADJECTIVES[int(_plan_rng(seed, i).integers(len(ADJECTIVES)))]
        prompt = tmpl.format(adjective=adj, cls=vocab.display(c, cfg.use_gloss))
        plans.append(ImagePlan(i, image_seed(seed, i), (c,), (1.0,), prompt))
    return plans


def plan_mixup(cfg: PromptConfig, vocab: ClassVocab, seed: int, start: int, stop: int) -> list[ImagePlan]:
    """`mixup`: k classes in one prompt ('a photo of a {A} and a {B}'), equal weights."""
    tmpl = cfg.mixup_template()
    plans: list[ImagePlan] = []
    for i in range(start, stop):
        classes = _mixup_classes(seed, len(vocab), cfg.k, i)
        names = [vocab.display(c, cfg.use_gloss) for c in classes]
        weights = tuple(1.0 / cfg.k for _ in classes)
        plans.append(ImagePlan(i, image_seed(seed, i), classes, weights, tmpl.format(*names)))
    return plans


def plan_mixup_embed(cfg: PromptConfig, vocab: ClassVocab, seed: int, start: int, stop: int) -> list[ImagePlan]:
    """`mixup-embed`: k single-class sub-prompts whose text embeddings are mixed with Dirichlet(alpha) weights."""
    plans: list[ImagePlan] = []
    for i in range(start, stop):
        classes = _mixup_classes(seed, len(vocab), cfg.k, i)
        names = [vocab.display(c, cfg.use_gloss) for c in classes]
        w = _plan_rng(seed, i).dirichlet([cfg.alpha] * cfg.k)
        subs = tuple(SUB_PROMPT.format(nm) for nm in names)
        prompt = " | ".join(f"{wi:.3f}*{p!r}" for wi, p in zip(w, subs))
        plans.append(ImagePlan(i, image_seed(seed, i), classes, tuple(float(x) for x in w), prompt, subs))
    return plans
