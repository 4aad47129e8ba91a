"""Real images imported from an npz (`x` uint8 NHWC, `y`) or an image folder: the upper-bound baseline."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from ...errors import MixqError
from ...utils import sha256_file
from ..prompts import ImagePlan
from .base import Generator, ShardOutput, register

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff")


def _hidden(name: str) -> bool:
    """A name no dataset means as data: dot-files and dot-folders (.git, .ipynb_checkpoints, macOS ._ files) and
    the __MACOSX folder of a zip made on a Mac."""
    return name.startswith(".") or name == "__MACOSX"


def _is_image(f: Path) -> bool:
    return f.suffix.lower() in IMAGE_SUFFIXES and not _hidden(f.name) and f.is_file()


def folder_files(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """Files in `root` (ImageFolder layout: class sub-folders give labels; flat folders have none). Hidden
    files and folders are not data; a folder with both images and class sub-folders is refused, since either
    reading of it would drop or mislabel images."""
    if not root.is_dir():
        raise MixqError(f"{root} is neither an npz file nor a folder of images")
    subdirs = sorted(d for d in root.iterdir() if d.is_dir() and not _hidden(d.name))
    loose = sorted(f for f in root.iterdir() if _is_image(f))
    if subdirs and loose:
        raise MixqError(f"{root} holds {len(loose)} image(s) beside {len(subdirs)} sub-folder(s) ({subdirs[0].name}, "
                        "...): put every image in a class folder (labelled) or none in a sub-folder (unlabelled)")
    files: list[Path] = []
    labels: list[int] = []
    if subdirs:
        for ci, d in enumerate(subdirs):
            for f in sorted(d.rglob("*")):
                if _is_image(f) and not any(_hidden(part) for part in f.relative_to(d).parts):
                    files.append(f)
                    labels.append(ci)
        return files, labels, [d.name for d in subdirs]
    return loose, [-1] * len(loose), []


def rgb8(im: Any) -> np.ndarray:
    """A PIL image as uint8 [H,W,3], upright as a viewer shows it (its EXIF orientation applied: a phone's
    portrait JPEG stores its pixels sideways). 16-bit (and 32-bit integer) greyscale is scaled down from its
    full range, where PIL's convert("RGB") would clip every value above 255 to white; float images are refused."""
    from PIL import ImageOps

    im = ImageOps.exif_transpose(im)
    if im.mode == "F":
        raise MixqError("a floating-point (mode F) image: give 8- or 16-bit images")
    if im.mode.startswith("I"):
        a = np.asarray(im).astype(np.float64)
        a = np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(np.repeat(a[..., None], 3, axis=2))
    return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def load_npz(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """`x` uint8 [N,H,W,1|3] and `y` (1-D integers, one per image) or None; one-line errors otherwise.

    numpy reads any non-zip file as a pickle, whose error ("allow_pickle") says nothing useful, so the
    zip container is checked first.
    """
    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise MixqError(f"cannot read {path}: {e.strerror or e}") from None
    if not zipfile.is_zipfile(path):
        kind = "a single .npy array" if magic == b"\x93NUMPY" else "not an npz (zip) archive"
        raise MixqError(f"{path} is {kind}: expected an .npz with arrays 'x' (uint8 [N,H,W,3]) and 'y' (labels)")
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise MixqError(f"{path} has no array 'x' (expected uint8 images [N,H,W,3])")
            x = z["x"]
            y = z["y"] if "y" in z else None
    except MixqError:
        raise
    except Exception as e:  # noqa: BLE001
        raise MixqError(f"cannot read {path}: {' '.join(str(e).split())}") from None
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3) or min(x.shape[1:3]) < 1:
        raise MixqError(f"{path}: 'x' must be uint8 [N,H,W,3] with H, W >= 1, got {x.dtype} {x.shape}")
    if y is not None:
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise MixqError(f"{path}: labels 'y' must be a 1-D integer array, got {y.dtype} {y.shape}")
        if len(y) != len(x):
            raise MixqError(f"{path}: {len(y)} labels 'y' for {len(x)} images 'x'")
    return x, y


def image_problem(path: Path) -> str | None:
    """Why `path` cannot be decoded (fully: a truncated JPEG only fails on load), or None."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode == "F":
                return "a floating-point (mode F) image: give 8- or 16-bit images"
            ImageOps.exif_transpose(im)  # as `rgb8` reads it: a malformed orientation tag is a bad file here
    except Exception as e:  # noqa: BLE001 - PIL raises OSError, SyntaxError, ValueError, DecompressionBombError
        return " ".join(str(e).split()) or type(e).__name__
    return None


def exif_turned(path: Path) -> bool:
    """Whether the image's EXIF orientation tag turns or mirrors it (`rgb8` applies it; only its header is read)."""
    from PIL import Image

    with Image.open(path) as im:  # a chosen file: `image_problem` read its tag already
        return im.getexif().get(0x0112, 1) in range(2, 9)


@register
class RealGenerator(Generator):
    """Take `--num` images of `--source`, a seeded random subset (the head of a seeded permutation, stored in
    that order, so `quantize --num-samples N` takes a random N as well), resized to `--size` if needed."""

    name = "real"
    option_names = ("source", "skip_bad_images")

    @classmethod
    def default_size(cls, model: nn.Module | None, options: dict[str, Any]) -> int:
        src = options.get("source")
        if src and Path(src).is_file() and str(src).endswith(".npz"):
            x, _ = load_npz(Path(src))
            return int(x.shape[1])
        return super().default_size(model, options)

    def _source(self) -> Path:
        src = self.ctx.options.get("source")
        if not src:
            raise MixqError("--generator real needs --source NPZ_OR_FOLDER")
        path = Path(src)
        if not path.exists():
            raise MixqError(f"--source {path} does not exist")
        return path

    def validate(self) -> None:
        path = self._source()
        n = len(load_npz(path)[0]) if path.is_file() else len(folder_files(path)[0])
        if n == 0:
            raise MixqError(f"--source {path} holds no images")
        if self.ctx.num > n:
            raise MixqError(f"--num {self.ctx.num} exceeds the {n} images in {path}")
        if path.is_dir():
            self._selection()  # decode every chosen image now, before any cache directory exists

    def _order(self, n: int) -> np.ndarray:
        return np.random.default_rng([self.ctx.seed, 0xDA7A]).permutation(n)

    def _selection(self) -> tuple[list[int], list[str]]:
        """Folder sources: the first `num` decodable files of the seeded permutation, and the files
        skipped on the way (recorded in the recipe, so the same folder always gives the same cache).
        Without --skip-bad-images the first undecodable file is an error."""
        if getattr(self, "_picked", None) is not None:
            return self._picked
        path = self._source()
        files, _, _ = folder_files(path)
        skip = bool(self.ctx.options.get("skip_bad_images"))
        chosen: list[int] = []
        skipped: list[str] = []
        warnings: list[str] = []
        for j in self._order(len(files)):
            if len(chosen) == self.ctx.num:
                break
            problem = image_problem(files[int(j)])
            if problem is None:
                chosen.append(int(j))
                continue
            if not skip:
                raise MixqError(f"cannot decode image {files[int(j)]}: {problem} (pass --skip-bad-images to leave "
                                "unreadable images out)")
            warnings.append(f"warning: skipping unreadable image {files[int(j)]}: {problem}")
            skipped.append(str(files[int(j)].relative_to(path)))
        if len(chosen) < self.ctx.num:
            raise MixqError(f"--source {path} holds only {len(chosen)} readable images ({len(skipped)} skipped, "
                            f"first {skipped[0] if skipped else '-'}), fewer than --num {self.ctx.num}")
        for w in warnings:  # only once the run goes ahead: a failure stays one line
            self.ctx.log(w)
        self._picked = (chosen, skipped)
        return self._picked

    def recipe(self) -> dict[str, Any]:
        path = self._source()
        out: dict[str, Any] = {"name": self.name, "source": str(path.resolve())}
        if path.is_file():
            out["source_id"] = sha256_file(path)
        else:
            files, _, _ = folder_files(path)
            # each file's bytes, not only its size: an edited image of the same size is another cache
            out["source_id"] = [[str(f.relative_to(path)), f.stat().st_size, sha256_file(f)] for f in files]
            skipped = self._selection()[1]
            if skipped:  # only then: a clean folder keeps the key it had before --skip-bad-images existed
                out["skipped"] = skipped
            # only where it changes pixels: a cache of such a folder made before the orientation was applied is
            # another key (its images lay sideways), every other folder keeps its key
            if any(exif_turned(files[j]) for j in self._selection()[0]):
                out["exif_orientation"] = "applied"
        out["selection"] = "seeded permutation" + (", unreadable files skipped" if out.get("skipped") else "")
        return out

    def setup(self) -> None:
        path = self._source()
        if path.is_file():
            self._x, y = load_npz(path)
            self._y = y if y is not None else np.full(len(self._x), -1)
            self._files = None
            self._picks = [int(j) for j in self._order(len(self._x))[: self.ctx.num]]
            total, skipped = len(self._x), 0
        else:
            self._files, labels, _ = folder_files(path)
            self._y = np.asarray(labels)
            self._picks = self._selection()[0]
            total, skipped = len(self._files), len(self._selection()[1])
        # The same wording as `pick_subset`'s: a seeded permutation's head is a seeded random sample.
        what = "all" if len(self._picks) == total else f"{len(self._picks)} of"
        self.ctx.log(f"data: {what} {total} images of {path.name}"
                     + ("" if what == "all" else f", random sample (seed {self.ctx.seed})")
                     + (f", {skipped} unreadable skipped" if skipped else ""))

    def _load(self, j: int) -> torch.Tensor:
        if self._files is None:
            img = torch.from_numpy(np.ascontiguousarray(self._x[j]))
            if img.shape[-1] == 1:
                img = img.expand(-1, -1, 3)
        else:
            from PIL import Image

            try:
                with Image.open(self._files[j]) as im:
                    img = torch.from_numpy(rgb8(im))
            except Exception as e:  # noqa: BLE001 - changed since validate() decoded it
                raise MixqError(f"cannot decode image {self._files[j]}: {' '.join(str(e).split())}") from None
        s = self.ctx.size
        if tuple(img.shape[:2]) != (s, s):
            img = resize_center(img, s)
        return img

    def generate(self, shard_index: int, plans: list[ImagePlan]) -> ShardOutput:
        imgs, extra = [], []
        for p in plans:
            j = self._picks[p.index]
            imgs.append(self._load(j))
            extra.append({"source_index": j, "label": int(self._y[j])})
        return ShardOutput(torch.stack(imgs), extra)


def resize_center(img: torch.Tensor, s: int | tuple[int, int]) -> torch.Tensor:
    """Scale to cover `s` (an int: a square; or (height, width)) keeping the aspect ratio, then centre crop:
    uint8 HWC -> uint8 [sh,sw,3]."""
    import torch.nn.functional as F

    sh, sw = (s, s) if isinstance(s, int) else (int(s[0]), int(s[1]))
    h, w = img.shape[:2]
    scale = max(sh / h, sw / w)
    nh, nw = max(sh, round(h * scale)), max(sw, round(w * scale))
    x = img.permute(2, 0, 1).unsqueeze(0).float()
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    top, left = (nh - sh) // 2, (nw - sw) // 2
    x = x[..., top:top + sh, left:left + sw]
    return x.round().clamp(0, 255).to(torch.uint8)[0].permute(1, 2, 0).contiguous()
