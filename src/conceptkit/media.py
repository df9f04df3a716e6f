"""Media files: reading clips (evenly spaced frames), writing PNG images and grids, MP4 clips with a PNG
frame strip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


class ClipReadError(ValueError):
    """A clip file that cannot give the frames asked for; the message says why in one line, callers add
    which file or corpus line it was and what to do."""


def read_clip_frames(path: Path, count: int) -> np.ndarray:
    """`count` evenly spaced frames of a clip file (first and last included), (count, H, W, 3) uint8; a
    still image reads as a one-frame clip."""
    import imageio.v3 as iio

    try:
        frames = iio.imread(path, index=None)
    except Exception as error:  # imageio raises many types for broken files
        # Decoders report over several lines; users get one.
        raise ClipReadError(f"cannot be read ({' '.join(str(error).split())})") from None
    frames = frames[None] if frames.ndim == 3 else frames
    if len(frames) < count:
        raise ClipReadError(f"has {len(frames)} frames, {count} are asked for (data.frames)")
    picks = np.linspace(0, len(frames) - 1, count).round().astype(int)
    return np.ascontiguousarray(frames[picks][..., :3])


def to_uint8(frame: torch.Tensor) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    return (frame.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def frame_strip(clip: torch.Tensor) -> np.ndarray:
    """(3, F, H, W) -> the F frames side by side."""
    return np.concatenate([to_uint8(clip[:, f]) for f in range(clip.shape[1])], axis=1)


def grid(media: torch.Tensor, columns: int | None = None) -> np.ndarray:
    """(N, 3, F, H, W) -> one image: a row per clip (its frame strip), or a grid of single frames."""
    n = media.shape[0]
    tiles = [frame_strip(m) for m in media]
    if media.shape[2] > 1:
        return np.concatenate(tiles, axis=0)
    columns = columns or min(n, 4)
    rows = (n + columns - 1) // columns
    h, w, _ = tiles[0].shape
    canvas = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        canvas[r * h:(r + 1) * h, c * w:(c + 1) * w] = tile
    return canvas


def save_png(array: np.ndarray, path: Path) -> None:
    from PIL import Image

    Image.fromarray(array).save(path)


def save_media(media: torch.Tensor, folder: Path, stem: str, fps: int = 16) -> list[Path]:
    """Each item as <stem>_<i>.png (images) or <stem>_<i>.mp4 + <stem>_<i>_frames.png (clips)."""
    import imageio.v3 as iio

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for i, item in enumerate(media):
        if item.shape[1] == 1:
            path = folder / f"{stem}_{i}.png"
            save_png(to_uint8(item[:, 0]), path)
            written.append(path)
        else:
            video = np.stack([to_uint8(item[:, f]) for f in range(item.shape[1])])
            path = folder / f"{stem}_{i}.mp4"
            # yuv420p keeps players happy but needs even sizes; odd ones get 4:4:4, which H.264 allows.
            even = video.shape[1] % 2 == 0 and video.shape[2] % 2 == 0
            iio.imwrite(path, video, fps=fps, codec="libx264", macro_block_size=1,
                        pixelformat="yuv420p" if even else "yuv444p")
            strip = folder / f"{stem}_{i}_frames.png"
            save_png(frame_strip(item), strip)
            written += [path, strip]
    return written
