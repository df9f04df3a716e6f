"""Corpora for encoder methods: many captioned images whose objects are known (mask, word, picture).

Per-concept methods train on a few images held in memory (`TrainingData`). Encoder methods (KV-mixed
visual prompts, BindWeave) train an adapter once on a corpus, then condition on any reference picture.
A corpus is a map-style torch Dataset of `CorpusItem`s, streamed through a DataLoader
(training: `CorpusMicroSteps`, one micro-step's items per loader item), never held whole in memory:
  - `ShapeWorldCorpus`: scenes generated on the fly, item i deterministic for (seed, i); exact masks
    from the renderer; objects drawn from the pretraining split only, so the held-out objects the
    benchmarks personalise never appear in it.
  - `ShapeWorldClipCorpus`: the same for clips of 1-2 moving objects (subject-to-video, BindWeave):
    the item's `video` is the clip, its `image` the clip's first frame, on which the objects' masks are.
  - `JsonlCorpus`: a user folder. One JSON object per line of `<folder>/corpus.jsonl` (paths relative
    to the folder):
        {"image": "img/0001.jpg", "caption": "a dog next to a red mug on a table",
         "objects": [{"word": "dog", "mask": "masks/0001_dog.png"}, {"word": "mug", "box": [x0, y0, x1, y1]}]}
    `word` must occur in the caption (objects in caption order; each is found after the previous one);
    `mask` is a PNG (nonzero = object) of the image's size, `box` pixel corners. A bad line stops with
    `<file>:<line>: <what> ...` and what to do.
    Clips (a video backbone trains on them, subject-to-video methods such as BindWeave): "video" instead
    of "image", a clip file (mp4, gif, webm, ...) whose `frames` evenly spaced frames are the item (as
    data.images takes a clip's frames); the objects' masks / boxes are on the clip's first frame, where
    their reference pictures are cut:
        {"video": "clips/0001.mp4", "caption": "a dog running left on a beach",
         "objects": [{"word": "dog", "mask": "masks/0001_dog.png"}]}
Each object also carries its reference picture: the object cut out of the image (outside its mask set to
REFERENCE_FILL, cropped to its box, padded square), what an encoder method conditions on in training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from conceptkit.errors import UserError

REFERENCE_FILL = 127  # grey outside the object's mask in a reference picture (ours: neither black nor white)
OBJECT_WORDS = ("shape", "description", "object")


@dataclass
class CorpusObject:
    word: str  # the caption's words for the object: where its conditioning tokens go
    span: tuple[int, int]  # character span of `word` in the caption
    mask: np.ndarray  # (H, W) bool on the item's image
    reference: np.ndarray  # (S, S, 3) uint8: the object cut out (see module docstring)
    description: str | None = None  # ShapeWorld: the object's world words, for the oracle


@dataclass
class CorpusItem:
    image: np.ndarray  # (H, W, 3) uint8 (a clip's: the frame its objects' masks are on, the first)
    caption: str
    objects: list[CorpusObject] = field(default_factory=list)
    video: np.ndarray | None = None  # (F, H, W, 3) uint8 for clip corpora


def reference_picture(image: np.ndarray, mask: np.ndarray, fill: int = REFERENCE_FILL) -> np.ndarray:
    """The object cut out of `image`: outside `mask` set to `fill`, cropped to the mask's box, padded to
    a square with `fill` (the object centred)."""
    if not mask.any():
        raise ValueError("the object's mask is empty")
    rows, columns = np.nonzero(mask)
    top, bottom, left, right = rows.min(), rows.max() + 1, columns.min(), columns.max() + 1
    cut = np.where(mask[..., None], image, np.uint8(fill))[top:bottom, left:right]
    side = max(cut.shape[0], cut.shape[1])
    square = np.full((side, side, 3), fill, dtype=np.uint8)
    y, x = (side - cut.shape[0]) // 2, (side - cut.shape[1]) // 2
    square[y:y + cut.shape[0], x:x + cut.shape[1]] = cut
    return square


class ShapeWorldCorpus(torch.utils.data.Dataset):
    """Captioned multi-object ShapeWorld scenes with exact masks, generated on the fly.

    `object_word` is what the caption says for each object, where its conditioning tokens go:
    "shape" (its shape noun, "a star left of a circle": the reference must carry colour and pattern),
    "description" (its world words, "a red striped star"), or "object" (the neutral word: the reference
    carries everything). Captions: "a <w1> <relation> a <w2> <background>" for two objects, else the
    objects joined by "and", then the background phrase of the captions grammar."""

    def __init__(self, size: int = 100_000, resolution: int = 64, seed: int = 0, split: str = "pretrain",
                 max_objects: int = 3, orientation: str = "upright", object_word: str = "shape"):
        if object_word not in OBJECT_WORDS:
            raise UserError(f"corpus.object_word={object_word!r}: choose one of {', '.join(OBJECT_WORDS)}")
        if not 1 <= max_objects <= 3:
            raise UserError(f"corpus.max_objects={max_objects}: ShapeWorld scenes hold 1 to 3 objects")
        self.size, self.resolution, self.seed, self.split = size, resolution, seed, split
        self.max_objects, self.orientation, self.object_word = max_objects, orientation, object_word

    def __len__(self) -> int:
        return self.size

    def _word(self, obj) -> str:
        from conceptkit.world.captions import describe_object

        return {"shape": obj.shape, "description": describe_object(obj), "object": "object"}[self.object_word]

    def __getitem__(self, index: int) -> CorpusItem:
        from conceptkit.world.captions import background_phrase, describe_object, relation
        from conceptkit.world.factors import sample_scene
        from conceptkit.world.render import object_masks, render_scene

        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(1, self.max_objects + 1))
        scene = sample_scene(rng, n_objects=count, split=self.split, orientation=self.orientation)
        image = render_scene(scene, self.resolution)
        masks = object_masks(scene, self.resolution)
        order = list(range(count))
        if count == 2 and rng.random() < 0.5:
            order.reverse()
        words = [self._word(scene.objects[i]) for i in order]
        pieces = []  # (text, object index or None)
        for k, i in enumerate(order):
            if k and count == 2:  # "a star left of a circle": where the first is relative to the second
                pieces.append((f" {relation(scene.objects[order[0]], scene.objects[order[1]])} ", None))
            elif k:
                pieces.append((" and " if k == count - 1 else ", ", None))
            article = "an " if words[k][0] in "aeiou" else "a "
            pieces += [(article, None), (words[k], i)]
        pieces.append((" " + background_phrase(scene.background, rng), None))
        caption, spans = "", {}
        for text, i in pieces:
            if i is not None:
                spans[i] = (len(caption), len(caption) + len(text))
            caption += text
        objects = []
        for i in order:
            if not masks[i].any():  # fully covered by a later object: nothing of it shows
                continue
            obj = scene.objects[i]
            objects.append(CorpusObject(caption[slice(*spans[i])], spans[i], masks[i],
                                        reference_picture(image, masks[i]), describe_object(obj)))
        return CorpusItem(image, caption, objects)


class ShapeWorldClipCorpus(ShapeWorldCorpus):
    """Captioned ShapeWorld clips of 1 or 2 moving objects (pretraining split only), generated on the fly.

    Captions follow the world's clip grammar with the objects' words (`object_word`, as ShapeWorldCorpus):
    "a star moving left slowly; a circle moving up quickly, on a teal background". Masks and references
    are on the first frame (what a subject-to-video method cuts its references from)."""

    def __init__(self, size: int = 100_000, resolution: int = 64, seed: int = 0, split: str = "pretrain",
                 max_objects: int = 2, frames: int = 9, object_word: str = "shape"):
        if not 1 <= max_objects <= 2:
            raise UserError(f"corpus.max_objects={max_objects}: ShapeWorld clips hold 1 or 2 moving objects")
        super().__init__(size=size, resolution=resolution, seed=seed, split=split, max_objects=max_objects,
                         orientation="random", object_word=object_word)
        self.frames = frames

    def __getitem__(self, index: int) -> CorpusItem:
        from conceptkit.world.captions import background_phrase, describe_object, motion_phrase
        from conceptkit.world.factors import sample_scene
        from conceptkit.world.render import object_masks, render_clip

        if not 0 <= index < self.size:
            raise IndexError(index)
        rng = np.random.default_rng([self.seed, index, 1])
        count = int(rng.integers(1, self.max_objects + 1))
        scene = sample_scene(rng, n_objects=count, split=self.split, clip_frames=self.frames)
        video = render_clip(scene, self.frames, self.resolution)
        masks = object_masks(scene, self.resolution)
        caption, objects = "", []
        for i, obj in enumerate(scene.objects):
            word = self._word(obj)
            caption += ("; " if i else "") + ("an " if word[0] in "aeiou" else "a ")
            span = (len(caption), len(caption) + len(word))
            caption += f"{word} {motion_phrase(scene.motions[i], rng)}"
            if masks[i].any():
                objects.append(CorpusObject(word, span, masks[i], reference_picture(video[0], masks[i]),
                                            describe_object(obj)))
        caption += ", " + background_phrase(scene.background, rng)
        return CorpusItem(video[0], caption, objects, video=video)


class JsonlCorpus(torch.utils.data.Dataset):
    """A user corpus: `<folder>/corpus.jsonl` (format in the module docstring). Every line is checked
    when the corpus is opened, so a bad line stops before any training, naming the file and line."""

    def __init__(self, folder: str | Path, filename: str = "corpus.jsonl", frames: int = 1):
        self.folder = Path(folder)
        self.path = self.folder / filename
        self.frames = int(frames)  # > 1: every line is a clip of this many frames (a video backbone trains)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such corpus file; write one JSON object per line (conceptkit.corpus)")
        self.entries = []
        for number, line in enumerate(self.path.read_text().splitlines(), start=1):
            if line.strip():
                self.entries.append(self._check(line, number))
        if not self.entries:
            raise UserError(f"{self.path}: the corpus has no items; add one JSON object per line")

    def _fail(self, number: int, what: str):
        raise UserError(f"{self.path}:{number}: {what}")

    def _check(self, line: str, number: int) -> dict:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            self._fail(number, f"not valid JSON ({error.msg}); write one JSON object per line")
        if not isinstance(entry, dict):
            self._fail(number, "each line must be a JSON object with image, caption, objects")
        if ("image" in entry) == ("video" in entry):
            self._fail(number, "needs exactly one of 'image' (a picture path) or 'video' (a clip path)")
        media = "video" if "video" in entry else "image"
        if self.frames > 1 and media == "image":
            self._fail(number, f"a video backbone trains on clips of {self.frames} frames: give this line a 'video' "
                               f"(a clip path) instead of an 'image'")
        for key, kind in ((media, str), ("caption", str), ("objects", list)):
            if not isinstance(entry.get(key), kind):
                self._fail(number, f"field {key!r} is missing or not a {kind.__name__}")
        if not (self.folder / entry[media]).is_file():
            self._fail(number, f"{media} {entry[media]!r} not found under {self.folder}")
        start = 0
        for k, obj in enumerate(entry["objects"]):
            where = f"objects[{k}]"
            if not isinstance(obj, dict) or not isinstance(obj.get("word"), str) or not obj["word"].strip():
                self._fail(number, f"{where} needs a non-empty 'word'")
            found = entry["caption"].find(obj["word"], start)
            if found < 0:
                self._fail(number, f"{where} word {obj['word']!r} is not in the caption after the previous object's "
                                   f"word; objects go in caption order and their words must appear in it")
            obj["_span"] = (found, found + len(obj["word"]))
            start = found + len(obj["word"])
            if ("mask" in obj) == ("box" in obj):
                self._fail(number, f"{where} needs exactly one of 'mask' (a PNG path) or 'box' ([x0, y0, x1, y1])")
            if "mask" in obj and not (self.folder / str(obj["mask"])).is_file():
                self._fail(number, f"{where} mask {obj['mask']!r} not found under {self.folder}")
            if "box" in obj:
                box = obj["box"]
                if (not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, (int, float)) for v in box)
                        or box[2] <= box[0] or box[3] <= box[1]):
                    self._fail(number, f"{where} box must be [x0, y0, x1, y1] in pixels with x1 > x0 and y1 > y0")
        entry["_line"] = number
        return entry

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> CorpusItem:
        from PIL import Image

        entry = self.entries[index]
        video = self._clip(entry) if "video" in entry else None
        image = video[0] if video is not None else np.asarray(Image.open(self.folder / entry["image"]).convert("RGB"))
        height, width = image.shape[:2]
        objects = []
        for k, obj in enumerate(entry["objects"]):
            if "mask" in obj:
                mask = np.asarray(Image.open(self.folder / obj["mask"]).convert("L")) > 0
                if mask.shape != (height, width):
                    self._fail(entry["_line"], f"objects[{k}] mask is {mask.shape[1]}x{mask.shape[0]}, the image "
                                               f"{width}x{height}; masks must have the image's size")
            else:
                x0, y0, x1, y1 = (int(round(v)) for v in obj["box"])
                mask = np.zeros((height, width), dtype=bool)
                mask[max(0, y0):min(height, y1), max(0, x0):min(width, x1)] = True
            if not mask.any():
                self._fail(entry["_line"], f"objects[{k}] covers no pixel of the image; check its mask or box")
            objects.append(CorpusObject(obj["word"], tuple(obj["_span"]), mask, reference_picture(image, mask)))
        return CorpusItem(image, entry["caption"], objects, video=video if self.frames > 1 else None)

    def _clip(self, entry: dict) -> np.ndarray:
        """The line's clip: `frames` evenly spaced frames (F, H, W, 3) uint8 (one frame when images train)."""
        from conceptkit.media import ClipReadError, read_clip_frames

        try:
            return read_clip_frames(self.folder / entry["video"], max(1, self.frames))
        except ClipReadError as error:
            self._fail(entry["_line"], f"video {entry['video']!r} {error}; fix or remove that line")


def square_resized(image: np.ndarray, resolution: int, nearest: bool = False) -> np.ndarray:
    """Centre-crop to a square and resize to resolution x resolution (masks: nearest)."""
    from PIL import Image

    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    crop = image[top:top + side, left:left + side]
    if side == resolution:
        return crop
    if crop.dtype == bool:
        picture = Image.fromarray(crop.astype(np.uint8) * 255).resize((resolution, resolution), Image.NEAREST)
        return np.asarray(picture) > 127
    method = Image.NEAREST if nearest else Image.BICUBIC
    return np.asarray(Image.fromarray(crop).resize((resolution, resolution), method))


def scene_pixels(items: list[CorpusItem], resolution: int) -> torch.Tensor:
    """The items' images as one (B, 3, 1, R, R) batch in [-1, 1] (centre-cropped, resized); clip items'
    videos as (B, 3, F, R, R)."""
    if items and items[0].video is not None:
        clips = np.stack([np.stack([square_resized(frame, resolution) for frame in item.video]) for item in items])
        return torch.from_numpy(clips).permute(0, 4, 1, 2, 3).float().div(127.5).sub(1)
    images = np.stack([square_resized(item.image, resolution) for item in items])
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1).unsqueeze(2)


def corpus_from_config(corpus_cfg, resolution: int, frames: int = 1):
    """data.corpus -> a corpus: `shapeworld` (generated on the fly; clips of `frames` frames when a
    video backbone trains on it, frames > 1) or a folder holding corpus.jsonl."""
    source = str(corpus_cfg.source)
    if source == "shapeworld" and frames > 1:
        return ShapeWorldClipCorpus(size=int(corpus_cfg.size), resolution=resolution, seed=int(corpus_cfg.seed),
                                    max_objects=min(2, int(corpus_cfg.max_objects)), frames=frames,
                                    object_word=str(corpus_cfg.object_word))
    if source == "shapeworld":
        return ShapeWorldCorpus(size=int(corpus_cfg.size), resolution=resolution, seed=int(corpus_cfg.seed),
                                max_objects=int(corpus_cfg.max_objects), object_word=str(corpus_cfg.object_word))
    if not Path(source).is_dir():
        raise UserError(f"data.corpus.source={source!r}: pass shapeworld or a folder holding corpus.jsonl")
    return JsonlCorpus(source, frames=frames)


class CorpusMicroSteps(torch.utils.data.Dataset):
    """Item m: (micro-step start + m, the corpus items drawn for it). Which items a micro-step gets is a
    function of (seed, stage, micro-step) alone (`draw`), so loader workers can render them ahead and a
    resumed run, which starts the loader at its next micro-step, draws exactly what it would have.
    The length stays the stage's `total` either way: Lightning counts a resumed epoch's batches from
    the restored position, and ends the stage at max_steps, before a resumed loader runs out."""

    def __init__(self, corpus, draw, start: int, total: int):
        self.corpus, self.draw, self.start, self.total = corpus, draw, start, total

    def __len__(self) -> int:
        return self.total

    def __getitem__(self, index: int):
        micro = self.start + index
        indices = self.draw(micro)
        return micro, indices, [self.corpus[int(i)] for i in indices]
