"""Diversified training prompts for one concept source, and the per-frame prompts of a video concept.

The official pipeline asks Qwen2.5-VL-7B-Instruct for 60 prompts describing the source. conceptkit
asks the vision-language model the user configures (`method.vlm`: a hub id or local folder, any
transformers image-text-to-text model, through conceptkit.captioning), or, without one, varies the
wording offline with fixed templates around the description (and warns: the offline prompts vary
the frame, not the content, so the binders see less diverse text).

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

from conceptkit.errors import UserError

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


def diversified_prompts(description: str, caption: str | None, count: int, vlm: str | None, image=None,
                        own: list[str] | None = None) -> list[str]:
    """The training prompts: the user's own list, else the VLM's, else the offline fallback."""
    if own:
        prompts = [str(p).strip() for p in own if str(p).strip()]
        if not prompts:
            raise UserError("method.prompts is a list of empty strings; give training prompts or set it to null")
        return prompts
    if count < 1:
        raise UserError(f"method.prompt_count must be at least 1, got {count}")
    if vlm:
        from conceptkit.captioning import caption_images

        answer = caption_images([image], vlm, instruction=INSTRUCTION.format(count=count),
                                max_new_tokens=60 * count)[0] or ""
        prompts = parse_prompt_lines(answer, count)
        if prompts:
            return prompts
        warnings.warn(f"method.vlm {vlm!r} returned no usable prompts; using the offline wordings", stacklevel=2)
    else:
        warnings.warn("method.vlm is not set: BiCo's training prompts are offline template wordings of the "
                      "description (less diverse than the paper's VLM prompts); set method.vlm=<Qwen2.5-VL id or "
                      "folder> or method.prompts=[...]", stacklevel=2)
    return offline_prompts(description, caption, count)


def still_prompts(description: str, caption: str | None) -> list[str]:
    """Offline wordings of one clip's frames: every still template around the description and the caption."""
    bases = [description] + ([caption] if caption and caption != description else [])
    return [template.format(d=base) for base in bases for template in STILL_TEMPLATES]


def per_frame_prompts(description: str, captions: list[str | None], frames: int, vlm: str | None = None,
                      images: list | None = None, own: list[str] | None = None,
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

        answers = caption_images(list(images), vlm, instruction=FRAME_INSTRUCTION, max_new_tokens=80)
        written = [parse_prompt_lines(answer or "", 1) for answer in answers]
        prompts = [lines or derived(k) for k, lines in enumerate(written)]
        failed = sum(1 for lines in written if not lines)
        if failed:
            warnings.warn(f"method.vlm {vlm!r} wrote no usable prompt for {failed} of {count} frames; those frames "
                          f"train with prompts derived from the clip's", stacklevel=2)
        return prompts
    source = ("method.prompts (motion words included)" if clip_pool
              else "offline still-image wordings of the description and caption")
    warnings.warn(f"this video concept's frames (stage 1) train with {source}, not per-frame prompts; set "
                  f"method.frame_prompts=[...] (still-image wording, no motion) or method.vlm=<Qwen2.5-VL id or folder>",
                  stacklevel=2)
    return [derived(k) for k in range(count)]
