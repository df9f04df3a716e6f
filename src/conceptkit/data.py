"""Training media: images and short clips from a folder, a glob or a file, with captions.

Media come back as one tensor (N, 3, F, H, W) in [-1, 1]: images are one-frame clips. Files are
sorted by name (ConceptPrism pairs captions with images in that order). Captions come from a
sidecar `<stem>.txt` beside each file, or from `data.captions` (a JSON object file name -> caption,
or a text file with one caption per line in sorted-file order), else from `data.captioner` (a model).
"""

from __future__ import annotations

import glob
import json
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from conceptkit.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}
VIDEO_SUFFIXES = {".mp4", ".gif", ".webm", ".mov", ".avi"}


@dataclass
class Media:
    pixels: torch.Tensor  # (N, 3, F, H, W) in [-1, 1]
    captions: list[str | None]
    names: list[str]


def bundled_examples() -> Path:
    return Path(str(resources.files("conceptkit") / "assets" / "examples"))


def find_media(spec: str | None) -> list[Path]:
    """Files named by data.images: a folder, a glob, or one file; the bundled examples when unset."""
    if spec is None:
        root = bundled_examples()
        return sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        where = f"folder {path}"
    elif path.is_file():
        files, where = [path], f"file {path}"
    else:
        files = sorted(Path(p) for p in glob.glob(str(path)) if Path(p).suffix.lower() in IMAGE_SUFFIXES | VIDEO_SUFFIXES)
        where = f"pattern {spec!r}"
    if not files:
        raise UserError(f"data.images: no images or clips found in {where} "
                        f"(expected {', '.join(sorted(IMAGE_SUFFIXES | VIDEO_SUFFIXES))})")
    return files


def _fit(image, resolution: int) -> np.ndarray:
    """Resize the shorter side to `resolution` and center-crop a square."""
    from PIL import Image

    image = image.convert("RGB")
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    return np.asarray(image, dtype=np.float32) / 127.5 - 1.0


def _read_image(path: Path, resolution: int) -> np.ndarray:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            image.load()
            return _fit(ImageOps.exif_transpose(image), resolution)[None]  # phone photos: honour EXIF rotation
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise UserError(f"data.images: cannot read image {path} ({error}); fix or remove that file") from None


def _read_clip(path: Path, resolution: int, frames: int) -> np.ndarray:
    from PIL import Image

    from conceptkit.media import ClipReadError, read_clip_frames

    try:
        picked = read_clip_frames(path, frames)
    except ClipReadError as error:
        raise UserError(f"data.images: clip {path} {error}; fix or remove that file") from None
    return np.stack([_fit(Image.fromarray(frame), resolution) for frame in picked])


def _captions(files: list[Path], captions_file: str | None) -> list[str | None]:
    table: dict[str, str] = {}
    if captions_file:
        path = Path(captions_file)
        if not path.is_file():
            raise UserError(f"data.captions: no such file {path}")
        if path.suffix == ".json":
            try:
                table = {str(k): str(v) for k, v in json.loads(path.read_text()).items()}
            except (json.JSONDecodeError, AttributeError) as error:
                raise UserError(f"data.captions: {path} is not a JSON object of file name -> caption ({error})") from None
        else:
            lines = [line.strip() for line in path.read_text().splitlines() if line.strip()]
            if len(lines) != len(files):
                raise UserError(f"data.captions: {path} has {len(lines)} lines for {len(files)} files (one per sorted file)")
            table = {f.name: line for f, line in zip(files, lines)}
    captions = []
    for f in files:
        sidecar = f.with_suffix(".txt")
        if f.name in table:
            captions.append(table[f.name])
        elif sidecar.is_file():
            captions.append(sidecar.read_text().strip() or None)
        else:
            captions.append(None)
    return captions


def load_media(spec: str | None, resolution: int, frames: int, video_backbone: bool,
               captions_file: str | None = None, captioner: str | None = None) -> Media:
    files = find_media(spec)
    clips = []
    for path in files:
        if path.suffix.lower() in VIDEO_SUFFIXES:
            if not video_backbone:
                raise UserError(f"data.images: {path} is a video clip, but this backbone trains on images; use backbone=wan21")
            clips.append(_read_clip(path, resolution, frames))
        else:
            clip = _read_image(path, resolution)
            clips.append(clip)
    lengths = {len(c) for c in clips}
    if len(lengths) > 1:
        raise UserError("data.images: mix of images and clips; train images and videos as separate concepts")
    pixels = torch.from_numpy(np.stack(clips)).permute(0, 4, 1, 2, 3).contiguous()  # N, 3, F, H, W
    captions = _captions(files, captions_file)
    if captioner:
        from conceptkit.captioning import fill_missing_captions

        captions = fill_missing_captions(files, captions, captioner)
    missing = [f.name for f, c in zip(files, captions) if c is None]
    if missing:
        warnings.warn(f"no caption for {len(missing)} of {len(files)} files ({', '.join(missing[:3])}...): methods "
                      f"that initialise from captions use their fallback caption; add <stem>.txt files, data.captions or data.captioner",
                      stacklevel=2)
    return Media(pixels=pixels, captions=captions, names=[f.name for f in files])
