"""Diversified training prompts for one concept source, and the per-frame prompts of a video concept.

The official pipeline asks Qwen2.5-VL-7B-Instruct for 60 prompts describing the source (for a video,
the whole clip: its spatial and temporal concept phrases). conceptkit asks the vision-language model
the user configures (`method.vlm`: a hub id or local folder, any transformers image-text-to-text model,
through conceptkit.captioning), or, without one, varies the wording offline with fixed templates
around the description (and warns: the offline prompts vary the frame, not the content, so the
binders see less diverse text).

What the VLM sees: an image source, its image (INSTRUCTION); a video source, several evenly spaced
frames of the clip in one message, in time order (CLIP_INSTRUCTION: subject, appearance and motion).
Several images rather than a video input: every chat VLM that takes images takes several (the same
processor call as one image, in every transformers version), each frame keeps its full resolution
(Qwen2.5-VL's video input fuses pairs of frames into one patch), and a few frames cost few tokens.
A model without a chat template (BLIP, ...) sees the first frame only.

`vlm` is a name (loaded for the call, then released) or a loaded conceptkit.captioning.VisionLanguageModel
(the caller's: BiCo loads the model once per concept and asks it for the clip's prompts and then for
every frame's).

Video concepts train their first stage on the clip's frames as images (temporal disentanglement).
The official code gives every frame its own prompt, written by the VLM from that frame and the
clip's spatial concept phrases only (motion phrases removed). `per_frame_prompts` returns one list of
candidate prompts per frame: the user's `method.frame_prompts` (every frame draws from it), else the
VLM's one prompt per frame, else still-image wordings derived from the clip's prompts: the user's
`method.prompts`, or the offline templates (without the one that says "video") around the
description and that clip's caption.
"""

from __future__ import annotations

import re
import warnings
from typing import TYPE_CHECKING

from conceptkit.errors import UserError

if TYPE_CHECKING:  # annotations only
    from conceptkit.captioning import VisionLanguageModel

# Offline wordings [ours]: each wraps the description; cycled (with the caption when one exists).
TEMPLATES = (
    "{d}", "a photo of {d}", "a picture of {d}", "a close-up of {d}", "a video of {d}", "{d}, high quality",
    "a detailed shot of {d}", "a cinematic shot of {d}", "a clear view of {d}", "an image showing {d}",
    "{d} in natural light", "a wide shot of {d}", "a realistic rendering of {d}", "a frame showing {d}",
    "a snapshot of {d}",
)

# Still-image wordings for a clip's frames: a frame is an image, so no template that says "video".
STILL_TEMPLATES = tuple(t for t in TEMPLATES if "video" not in t)

INSTRUCTION = ("Write {count} different prompts for a text-to-video model that would reproduce what this image "
               "shows: the subject, its appearance and its surroundings. Each prompt one sentence of 10 to 40 "
               "words, varied in wording. One prompt per line, no numbering.")

CLIP_INSTRUCTION = ("These {frames} images are frames of one video clip, in time order. Write {count} different "
                    "prompts for a text-to-video model that would reproduce this video: the subject, its appearance, "
                    "its surroundings and its motion (how it moves or changes over the clip). Each prompt one "
                    "sentence of 10 to 40 words, varied in wording. One prompt per line, no numbering.")

FRAME_INSTRUCTION = ("Write one prompt for a text-to-image model that would reproduce this still frame of a video: "
                     "the subject, its appearance and its surroundings. Describe what is visible, not motion or "
                     "change over time. One sentence of 10 to 40 words, no numbering.")


def offline_prompts(description: str, caption: str | None, count: int) -> list[str]:
    bases = [description] + ([caption] if caption and caption != description else [])
    prompts = []
    for i in range(count):
        template = TEMPLATES[i % len(TEMPLATES)]
        base = bases[(i // len(TEMPLATES)) % len(bases)]
        prompts.append(template.format(d=base))
    return prompts


def parse_prompt_lines(text: str, count: int) -> list[str]:
    """A VLM answer -> up to `count` prompts: one per non-empty line, list markers stripped."""
    prompts = []
    for line in text.splitlines():
        line = re.sub(r"^\s*(?:[-*\u2022]|\d+[.):])\s*", "", line).strip().strip('"').strip()
        if len(line.split()) >= 3:
            prompts.append(line)
    return prompts[:count]


def vlm_name(vlm: str | VisionLanguageModel) -> str:
    """The name a warning shows for `method.vlm`, given as a name or as a loaded model."""
    return str(getattr(vlm, "name", vlm))


def diversified_prompts(description: str, caption: str | None, count: int, vlm: str | VisionLanguageModel | None,
                        image=None, own: list[str] | None = None, clip: list | None = None) -> list[str]:
    """The training prompts: the user's own list, else the VLM's, else the offline fallback.
    The VLM sees `clip` (frames of a video source, in time order) when given, else `image`."""
    if own:
        prompts = [str(p).strip() for p in own if str(p).strip()]
        if not prompts:
            raise UserError("method.prompts is a list of empty strings; give training prompts or set it to null")
        return prompts
    if count < 1:
        raise UserError(f"method.prompt_count must be at least 1, got {count}")
    if vlm:
        from conceptkit.captioning import caption_images

        if clip:
            message, instruction = list(clip), CLIP_INSTRUCTION.format(frames=len(clip), count=count)
        else:
            message, instruction = image, INSTRUCTION.format(count=count)
        answer = caption_images([message], vlm, instruction=instruction, max_new_tokens=60 * count,
                                setting="method.vlm")[0] or ""
        prompts = parse_prompt_lines(answer, count)
        if prompts:
            return prompts
        warnings.warn(f"method.vlm {vlm_name(vlm)!r} returned no usable prompts; using the offline wordings",
                      stacklevel=2)
    else:
        warnings.warn("method.vlm is not set: BiCo's training prompts are offline template wordings of the "
                      "description (less diverse than the paper's VLM prompts); set method.vlm=<Qwen2.5-VL id or "
                      "folder> or method.prompts=[...]", stacklevel=2)
    return offline_prompts(description, caption, count)


def still_prompts(description: str, caption: str | None) -> list[str]:
    """Offline wordings of one clip's frames: every still template around the description and the caption."""
    bases = [description] + ([caption] if caption and caption != description else [])
    return [template.format(d=base) for base in bases for template in STILL_TEMPLATES]


def per_frame_prompts(description: str, captions: list[str | None], frames: int,
                      vlm: str | VisionLanguageModel | None = None, images: list | None = None,
                      own: list[str] | None = None,
                      clip_prompts: list[str] | None = None) -> list[list[str]]:
    """Stage-1 prompts of a video concept: one candidate list per frame, clip by clip (frame k of clip n
    at n * frames + k). `images` (PIL, same order) are needed only when the VLM writes them."""
    count = len(captions) * frames
    if own:
        pool = [str(p).strip() for p in own if str(p).strip()]
        if not pool:
            raise UserError("method.frame_prompts is a list of empty strings; give still-image prompts or set it to null")
        return [list(pool) for _ in range(count)]
    clip_pool = [str(p).strip() for p in clip_prompts or [] if str(p).strip()]

    def derived(k: int) -> list[str]:
        return list(clip_pool) if clip_pool else still_prompts(description, captions[k // frames])

    if vlm:
        from conceptkit.captioning import caption_images

        answers = caption_images(list(images), vlm, instruction=FRAME_INSTRUCTION, max_new_tokens=80,
                                 setting="method.vlm")
        written = [parse_prompt_lines(answer or "", 1) for answer in answers]
        prompts = [lines or derived(k) for k, lines in enumerate(written)]
        failed = sum(1 for lines in written if not lines)
        if failed:
            warnings.warn(f"method.vlm {vlm_name(vlm)!r} wrote no usable prompt for {failed} of {count} frames; "
                          f"those frames train with prompts derived from the clip's", stacklevel=2)
        return prompts
    source = ("method.prompts (motion words included)" if clip_pool
              else "offline still-image wordings of the description and caption")
    warnings.warn(f"this video concept's frames (stage 1) train with {source}, not per-frame prompts; set "
                  f"method.frame_prompts=[...] (still-image wording, no motion) or method.vlm=<Qwen2.5-VL id or folder>",
                  stacklevel=2)
    return [derived(k) for k in range(count)]
