"""Class vocabularies: the names prompts are made of and the label indices inversion targets."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MixqError

CIFAR10 = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# CIFAR-100 fine labels in their index order (the dataset's own `fine_label_names`).
CIFAR100 = tuple(
    """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel
    can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur
    dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion
    lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree
    pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea
    seal shark shrew skunk skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table
    tank telephone television tiger tractor train trout tulip turtle wardrobe whale willow_tree wolf woman
    worm""".split()
)


@dataclass(frozen=True)
class ClassVocab:
    """Ordered class names (index = the model's label index) with optional glosses for disambiguation."""

    source: str
    names: tuple[str, ...]
    glosses: tuple[str, ...] = field(default=())

    def __len__(self) -> int:
        return len(self.names)

    def display(self, i: int, with_gloss: bool = False) -> str:
        name = self.names[i]
        gloss = self.glosses[i] if self.glosses else ""
        if with_gloss and gloss and not name.endswith(f", {gloss}"):  # a repeated name already took its gloss
            return f"{name}, {gloss}"
        return name


def _imagenet() -> ClassVocab:
    """ImageNet-1k names and WordNet glosses from timm's bundled metadata (no hand-copied list)."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo()
    names, glosses, synonyms = [], [], []
    for i in range(info.num_classes()):
        desc = [w.strip() for w in info.index_to_description(i).split(",")]
        names.append(desc[0])
        synonyms.append(desc[1:])
        detailed = info.index_to_description(i, detailed=True)
        glosses.append(detailed.split(":", 1)[1].strip() if ":" in detailed else "")
    # WordNet's first words repeat (crane the bird and the machine, Cardigan the corgi and the sweater, two
    # maillots): a prompt must name one class, so a repeated name takes its next synonym, else its gloss
    for fix in (lambda i: synonyms[i][-1] if synonyms[i] else names[i], lambda i: f"{names[i]}, {glosses[i]}"):
        seen: dict[str, list[int]] = {}
        for i, n in enumerate(names):
            seen.setdefault(n.lower(), []).append(i)
        for same in (v for v in seen.values() if len(v) > 1):
            for i in same:
                names[i] = fix(i)
    return ClassVocab("imagenet", tuple(names), tuple(glosses))


def resolve_classes(spec: str, model) -> str:
    """`auto`: the vocabulary that matches the model's class count (10: cifar10, 100: cifar100, else
    imagenet); any other spec is returned as given."""
    if spec != "auto":
        return spec
    n = getattr(model, "num_classes", None) if model is not None else None
    return {10: "cifar10", 100: "cifar100"}.get(n, "imagenet")


def load_classes(spec: str) -> ClassVocab:
    """`imagenet`, `cifar10`, `cifar100`, or a text file with one class name per line."""
    key = spec.strip().lower()
    if key in ("imagenet", "imagenet1k", "imagenet-1k"):
        return _imagenet()
    if key == "cifar10":
        return ClassVocab("cifar10", CIFAR10)
    if key == "cifar100":
        return ClassVocab("cifar100", tuple(n.replace("_", " ") for n in CIFAR100))
    path = Path(spec)
    if not path.is_file():
        raise MixqError(f"unknown class vocabulary {spec!r}: use imagenet, cifar10, cifar100 or a text file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise MixqError(f"cannot read class file {path}: {e}") from None
    names: list[str] = []
    first_line: dict[str, int] = {}
    for lineno, line in enumerate(lines, 1):
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        key = " ".join(name.lower().split())  # "Cat" and "cat " would give the same prompt
        if key in first_line:
            raise MixqError(
                f"class file {path} lists {name!r} twice (lines {first_line[key]} and {lineno}): "
                "class names must be unique, or prompts read 'a photo of a cat and a cat'"
            )
        first_line[key] = lineno
        names.append(name)
    if not names:
        raise MixqError(f"class file {path} lists no classes (one name per line; '#' starts a comment)")
    return ClassVocab(str(path), tuple(names))
