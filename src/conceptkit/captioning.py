"""Optional automatic captions from an image-to-text model (`data.captioner=<hub id or local folder>`).

ConceptPrism initialises each residual group from a caption of its image (the official code asks a VLM
for 8-32 words on subject, background, lighting and style). Any transformers model of the
image-text-to-text family works: chat VLMs (Qwen2.5-VL, ...) get the instruction through their chat
template, captioners without one (BLIP, ...) get it as a text prefix. Only files with no caption from
a sidecar or `data.captions` are captioned.
"""

from __future__ import annotations

from pathlib import Path

from conceptkit.errors import UserError

DEFAULT_INSTRUCTION = ("Describe this image in one sentence of 8 to 32 words: the subject, the background, "
                       "the lighting and the style.")


def caption_images(images: list, model: str, instruction: str = DEFAULT_INSTRUCTION,
                   max_new_tokens: int = 48) -> list[str]:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        processor = AutoProcessor.from_pretrained(model)
        network = AutoModelForImageTextToText.from_pretrained(
            model, torch_dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    except (OSError, ValueError) as error:
        raise UserError(f"data.captioner: cannot load captioning model {model!r} ({type(error).__name__}); "
                        f"point it at a local folder or set data.captioner=null") from None
    chat = getattr(processor, "chat_template", None) is not None
    captions = []
    for image in images:
        if chat:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": instruction}]}]
            text = processor.apply_chat_template(messages, add_generation_prompt=True)
        else:
            text = ""  # plain captioners caption best unprompted
        inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        with torch.no_grad():
            generated = network.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        prompt_length = inputs["input_ids"].shape[1] if chat and "input_ids" in inputs else 0
        caption = processor.batch_decode(generated[:, prompt_length:], skip_special_tokens=True)[0].strip()
        captions.append(" ".join(caption.split()) or None)
    return captions


def fill_missing_captions(files: list[Path], captions: list[str | None], model: str) -> list[str | None]:
    from PIL import Image

    from conceptkit.data import VIDEO_SUFFIXES

    missing = [i for i, c in enumerate(captions) if c is None]
    if not missing:
        return captions
    images = []
    for i in missing:
        if files[i].suffix.lower() in VIDEO_SUFFIXES:
            import imageio.v3 as iio

            images.append(Image.fromarray(iio.imread(files[i], index=0)[..., :3]))
        else:
            with Image.open(files[i]) as image:
                images.append(image.convert("RGB"))
    filled = list(captions)
    for i, caption in zip(missing, caption_images(images, model)):
        filled[i] = caption
    return filled
