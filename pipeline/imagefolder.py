"""Image folders as users have them → one uint8 `.npz` under inputs/ that the `npz` data kind reads.

Two layouts: one subfolder per class (labels from the sorted folder names, kept as `class_names`) or a
flat folder of images (unconditional: no `labels` array). Every image is centre-cropped to a square and
resized to N×N with Pillow (`ImageOps.fit`), so mixed sizes and aspect ratios are fine.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.atomic import atomic_write_bytes

GRAY_MODES = {"1", "L", "LA", "I", "I;16", "F"}


class ImageFolderError(ValueError):
    """A folder that cannot become a data set; the message is one line naming the folder or file."""


@dataclass
class ImageSet:
    images: np.ndarray  # (N, C, size, size) uint8
    labels: np.ndarray | None  # (N,) int64, None for a flat (unconditional) folder
    class_names: list[str] | None
    skipped: list[Path] = field(default_factory=list)  # unreadable files left out under skip_bad

    @property
    def conditional(self) -> bool:
        return self.labels is not None


def _image_suffixes() -> set[str]:
    return {suffix.lower() for suffix in Image.registered_extensions()}


def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _images_in(folder: Path, suffixes: set[str]) -> list[Path]:
    return [p for p in _visible(folder) if p.is_file() and p.suffix.lower() in suffixes]


def _layout(folder: Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """Files, their labels and the class names (None, None for a flat folder)."""
    if not folder.is_dir():
        raise ImageFolderError(f"{folder}: no such folder")
    entries = _visible(folder)
    if not entries:
        raise ImageFolderError(f"{folder}: empty folder (expected images, or one subfolder of images per class)")
    suffixes = _image_suffixes()
    subfolders = [p for p in entries if p.is_dir()]
    top_images = _images_in(folder, suffixes)
    if subfolders and top_images:
        raise ImageFolderError(f"{folder}: holds both images ({top_images[0].name}, …) and subfolders "
                               f"({subfolders[0].name}, …); use one subfolder per class or a flat folder")  # fmt: skip
    if top_images:
        return top_images, None, None
    if not subfolders:
        raise ImageFolderError(f"{folder}: no image files (found {len(entries)} other files, e.g. {entries[0].name}; "
                               f"Pillow reads .png, .jpg, .jpeg, .bmp, .webp, …)")  # fmt: skip
    files, labels, names = [], [], []
    for subfolder in subfolders:
        images = _images_in(subfolder, suffixes)
        if not images:
            raise ImageFolderError(f"{subfolder}: class folder without image files")
        labels += [len(names)] * len(images)
        files += images
        names.append(subfolder.name)
    return files, labels, names


def _read(path: Path, size: int, channels: int | None) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        mode = channels or (1 if image.mode in GRAY_MODES else 3)
        converted = image.convert("L" if mode == 1 else "RGB")
    return ImageOps.fit(converted, (size, size), method=Image.Resampling.BICUBIC, centering=(0.5, 0.5))


def read_image_folder(folder: Path, size: int, channels: int | None = None, skip_bad: bool = False) -> ImageSet:
    """Every image of `folder` as (N, C, size, size) uint8; `channels` None = 1 if every image is grayscale, else 3.

    An unreadable image file raises ImageFolderError naming it, or is skipped and listed when `skip_bad`.
    """
    if size < 4:
        raise ImageFolderError(f"--size {size}: must be at least 4 pixels")
    if channels not in (None, 1, 3):
        raise ImageFolderError(f"--channels {channels}: allowed 1 (grayscale) or 3 (RGB)")
    files, labels, names = _layout(folder)
    images, kept, skipped = [], [], []
    for index, path in enumerate(files):
        try:
            images.append(_read(path, size, channels))
        except (UnidentifiedImageError, OSError, ValueError) as exc:
            if not skip_bad:
                raise ImageFolderError(f"{path}: not a readable image ({exc.__class__.__name__}); "
                                       "remove it or pass --skip-bad") from None  # fmt: skip
            skipped.append(path)
            continue
        kept.append(index)
    if not images:
        raise ImageFolderError(f"{folder}: none of its {len(files)} image files could be read")
    mode = "L" if (channels or max(1 if image.mode == "L" else 3 for image in images)) == 1 else "RGB"
    stacked = np.stack([np.asarray(image.convert(mode)) for image in images])
    stacked = stacked[:, None] if stacked.ndim == 3 else stacked.transpose(0, 3, 1, 2)
    chosen = None if labels is None else np.asarray(labels, np.int64)[kept]
    if chosen is not None and len(np.unique(chosen)) != len(names or []):
        raise ImageFolderError(f"{folder}: after skipping unreadable files a class folder has no images left")
    return ImageSet(np.ascontiguousarray(stacked, dtype=np.uint8), chosen, names, skipped)


def write_npz(images: ImageSet, path: Path) -> None:
    """The `npz` data kind's format: `images` uint8, and `labels` + `class_names` only for class folders."""
    arrays: dict[str, np.ndarray] = {"images": images.images}
    if images.labels is not None:
        arrays.update(labels=images.labels, class_names=np.asarray(images.class_names, dtype=np.str_))
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, buffer.getvalue())
