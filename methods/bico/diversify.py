"""Diversified training prompts for one concept source.

The official pipeline asks Qwen2.5-VL-7B-Instruct for 60 prompts describing the source. conceptkit
asks the vision-language model the user configures (`method.vlm`: a hub id or local folder, any
transformers image-text-to-text model, through conceptkit.captioning), or, without one, varies the
wording offline with fixed templates around the description (and warns: the offline prompts vary
the frame, not the content, so the binders see less diverse text).
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

INSTRUCTION = ("Write {count} different prompts for a text-to-video model that would reproduce what this image "
               "shows: the subject, its appearance and its surroundings. Each prompt one sentence of 10 to 40 "
               "words, varied in wording. One prompt per line, no numbering.")


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
