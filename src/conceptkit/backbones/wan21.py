"""Wan2.1 text-to-video (`wan21`) and image-to-video (`wan21_i2v`): WanTransformer3DModel +
AutoencoderKLWan + UMT5 encoder, flow matching.

`task=i2v` is the same class with Wan2.1-I2V's denoiser (36 input channels, a CLIP image context and
image K/V projections in every cross-attention), conditioned by a `VideoCondition` that an encoder
method (BindWeave) sets (video_condition.py; without one: zero condition channels and zero CLIP rows);
everything else is shared with text-to-video.

Images train as one-frame videos. Training follows rectified flow: x_t = (1 - s) x_0 + s * eps,
target = eps - x_0, with s drawn uniformly and shifted (shift 5 as in DiffSynth's Wan training,
which the BiCo code uses; DiffSynth's Gaussian-bump loss weighting over timesteps is not applied);
sampling defaults to UniPC with flow shift 3 and CFG 5 (Wan's 480p defaults).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from conceptkit.attention import AttentionSite, ContextRows, WanAttnProcessor
from conceptkit.backbones.base import Backbone, LatentDistribution, NoisyBatch, shipped_weights_folder
from conceptkit.backbones.video_condition import MASK_CHANNELS, ContextKeyPadding, VideoCondition, rows_for
from conceptkit.errors import UserError
from conceptkit.tokens import TokenizedPrompts

WAN13B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
# Wan2.1-I2V-14B-720P (diffusers' WanTransformer3DModel defaults are the 14B sizes).
WAN14B_I2V_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=36, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=1280, added_kv_proj_dim=5120, rope_max_seq_len=1024,
)
I2V_EXTRA_CHANNELS = 20  # Wan2.1-I2V: a 4-channel mask block and 16 VAE condition channels after the noisy latents
TASKS = {"t2v": "wan21", "i2v": "wan21_i2v"}  # task -> backbone family
UMT5_XXL_CONFIG = dict(vocab_size=256384, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                       relative_attention_num_buckets=32, feed_forward_proj="gated-gelu")


class Wan21Backbone(Backbone):
    family = "wan21"
    lora_prefix = "transformer"  # diffusers' LoRA file key prefix for this denoiser
    RESOLUTIONS = {"full": 480, "shapes": 64, "tiny": 32}
    is_video = True
    vae_in_float32 = True
    default_guidance = 5.0  # Wan2.1's own default

    def __init__(self, *, architecture: str = "full", weights: str = "pretrained",
                 pretrained: str = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
                 path: str | None = None, revision: str | None = None, dtype: str = "float32",
                 resolution: int | None = None, max_text_tokens: int = 512, seed: int = 0,
                 frames: int = 81, fps: int = 16, train_shift: float = 5.0, sample_shift: float = 3.0,
                 default_scheduler: str = "unipc", task: str = "t2v", image_encoder: str | None = None,
                 mllm: str | None = None):
        if task not in TASKS:
            raise UserError(f"backbone.task must be one of {', '.join(TASKS)}, got {task!r}")
        self.task = task
        self.family = TASKS[task]
        super().__init__(architecture=architecture, weights=weights, pretrained=pretrained, path=path,
                         revision=revision, dtype=dtype, resolution=resolution, max_text_tokens=max_text_tokens,
                         seed=seed)
        if (frames - 1) % 4 != 0:
            raise UserError(f"backbone.frames must be 1 + 4k (Wan's VAE compresses time by 4), got {frames}")
        self.default_frames = frames
        self.fps = fps
        self.train_shift = train_shift
        self.sample_shift = sample_shift
        self.default_scheduler = default_scheduler
        self.image_encoder_name = image_encoder  # i2v: None = the architecture's (image_encoder_source)
        self.mllm_name = mllm  # i2v: the MLLM encoder methods read (mllm_source)
        self._mllm = None
        self._condition: tuple[str, VideoCondition] | None = None  # (owner, condition), i2v only
        self._key_padding = ContextKeyPadding()
        self._zero_video: dict[tuple, torch.Tensor] = {}  # (frames, h, w) -> condition channels of a zero video

    def config(self) -> dict:
        return dict(architecture=self.architecture, weights=self.weights, pretrained=self.pretrained, path=self.path,
                    revision=self.revision,
                    dtype=self.dtype_name, resolution=self.resolution, max_text_tokens=self.max_text_tokens,
                    seed=self.seed, frames=self.default_frames, fps=self.fps, train_shift=self.train_shift,
                    sample_shift=self.sample_shift, default_scheduler=self.default_scheduler, task=self.task,
                    image_encoder=self.image_encoder_name, mllm=self.mllm_name)

    def _build_random_modules(self) -> None:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from conceptkit.backbones import tiny, toy

        if self.architecture == "tiny":
            self.tokenizer, self.text_encoder, self.denoiser, self.vae = tiny.tiny_wan21_modules(self.seed)
        elif self.architecture == "shapes":
            self.tokenizer, self.text_encoder, self.denoiser, self.vae = toy.shapes_wan21_modules(self.seed)
        elif self.task == "i2v" and not torch.cuda.is_available():
            # Wan2.1-I2V-14B and UMT5-XXL do not fit a CPU machine's memory: built on the meta device, a
            # layout to count (memory_estimate) that cannot run.
            with torch.device("meta"):
                self._build_full_size(UMT5Config, UMT5EncoderModel, WanTransformer3DModel, AutoencoderKLWan, tiny)
        else:
            self._build_full_size(UMT5Config, UMT5EncoderModel, WanTransformer3DModel, AutoencoderKLWan, tiny)
        if self.task == "i2v" and self.denoiser.config.image_dim is None:
            # Random toy sizes: the text-to-video layout with Wan2.1-I2V's extra input channels, image
            # context and image K/V projections, all random.
            self.denoiser = WanTransformer3DModel(**image_to_video_config(self.denoiser.config,
                                                                          self._image_encoder_dim()))
        self._set_latent_geometry()

    def _build_full_size(self, UMT5Config, UMT5EncoderModel, WanTransformer3DModel, AutoencoderKLWan, tiny) -> None:
        self.tokenizer = tiny.build_tiny_t5_tokenizer(self.max_text_tokens)
        self.text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG))
        config = WAN14B_I2V_TRANSFORMER_CONFIG if self.task == "i2v" else WAN13B_TRANSFORMER_CONFIG
        self.denoiser = WanTransformer3DModel(**config)
        self.vae = AutoencoderKLWan()

    @property
    def layout_only(self) -> bool:
        """True where the modules sit on the meta device (full-size I2V at random without a GPU)."""
        return next(self.denoiser.parameters()).is_meta

    def _image_encoder_dim(self) -> int:
        from conceptkit.encoders import image_encoder_shape

        return image_encoder_shape(self.image_encoder_source())[1]

    def _load_pretrained_modules(self, source: str) -> None:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import AutoTokenizer, UMT5EncoderModel

        kw = {"revision": self.revision}
        model_kw = {**kw, "torch_dtype": self.dtype}
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            self.text_encoder = UMT5EncoderModel.from_pretrained(source, subfolder="text_encoder", **model_kw)
            self.denoiser = WanTransformer3DModel.from_pretrained(source, subfolder="transformer", **model_kw)
            self.vae = AutoencoderKLWan.from_pretrained(source, subfolder="vae", **kw, torch_dtype=torch.float32)
        except (OSError, ValueError) as error:
            raise self._missing_weights(error) from None
        if self.task == "i2v" and self.denoiser.config.image_dim is None:
            # The ShapeWorld toy (or any text-to-video checkpoint): grown into Wan2.1-I2V's layout, so it
            # starts as the text-to-video model it was (image_to_video_denoiser) and BindWeave trains the rest.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.denoiser = image_to_video_denoiser(self.denoiser, self._image_encoder_dim()).to(self.dtype)
        self._set_latent_geometry()

    def _source(self) -> str:
        if self.task == "i2v" and self.architecture == "shapes" and not self.path:
            return str(shipped_weights_folder("wan21_shapes"))  # grown into I2V at load
        return super()._source()

    # image-to-video ---------------------------------------------------------------------------
    def _pretrained_image_encoder(self) -> str:
        """i2v's CLIP image encoder: Wan2.1-I2V's own (CLIPVisionModel ViT-H/14, the checkpoint's
        image_encoder folder)."""
        if self.task != "i2v":
            return super()._pretrained_image_encoder()
        return str(Path(self.path) / "image_encoder") if self.path else f"{self.pretrained}:image_encoder"

    def mllm_source(self) -> str:
        """The multimodal LLM encoder methods read (conceptkit.mllm): Qwen2.5-VL-7B-Instruct for real
        weights, the shipped ShapeWorld Qwen2.5-VL for the toy, the test-size one elsewhere (see the
        wan21_i2v configs)."""
        if self.mllm_name:
            return self.mllm_name
        if self.weights == "pretrained" and self.architecture in ("full", "shapes"):
            return "Qwen/Qwen2.5-VL-7B-Instruct" if self.architecture == "full" else "shapes_qwen25vl"
        return "random:qwen25vl-tiny"

    def mllm(self):
        """The frozen MLLM (conceptkit.mllm.MultimodalStates), built on first use on this device; never
        part of a concept."""
        if self._mllm is None:
            from conceptkit.mllm import load_mllm

            self._mllm = load_mllm(self.mllm_source(), seed=self.seed, dtype=self.dtype).to(self.device)
        return self._mllm

    @property
    def image_rows(self) -> int:
        """Context rows that go through the image K/V projections: one picture's CLIP tokens (257 for
        ViT-H/14 at 224 px). Wan2.1-I2V and BindWeave's official code split there; diffusers' `len - 512`
        would send BindWeave's extra rows through them too."""
        from conceptkit.encoders import image_encoder_shape

        return image_encoder_shape(self.image_encoder_source())[0]

    def set_condition(self, owner: str, condition: VideoCondition | None) -> None:
        """What the i2v denoiser sees beside the text (video_condition.py); None removes `owner`'s."""
        if self.task != "i2v":
            raise UserError(f"backbone {self.family} takes no reference condition; use a wan21_i2v backbone")
        if condition is None:
            if self._condition is not None and self._condition[0] == owner:
                self._condition = None
                self._key_padding.valid = None
            return
        if self._condition is not None and self._condition[0] != owner:
            raise UserError(f"the backbone is already conditioned by {self._condition[0]}; one reference-conditioned "
                            f"concept per prompt on {self.family}")
        self._condition = (owner, condition)

    def condition(self) -> VideoCondition | None:
        return None if self._condition is None else self._condition[1]

    def _active_condition(self, latents: torch.Tensor) -> VideoCondition:
        """The condition set by a method, else "no reference": no slot frames, zero condition channels
        for the video and one picture's worth of zero CLIP rows (an unconditioned Wan2.1-I2V input)."""
        condition = self.condition()
        if condition is not None:
            return condition
        _, _, _, h, w = latents.shape
        encoder_dim = self.denoiser.config.image_dim
        return VideoCondition(latents.new_zeros(1, 0, MASK_CHANNELS + latents.shape[1], h, w),
                              latents.new_zeros(1, self.image_rows, encoder_dim))

    def reference_slots(self, canvases: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """References as slot frames of the condition: (K, 4 + z, h, w) = each mask (nearest-resized to the
        latent grid) in channel 0 of the mask block, the other three zero, then the VAE latents (the
        posterior's mode) of each canvas ((K, 3, H, W) in [-1, 1], the video's size) as a one-frame video;
        one batched VAE call for all K."""
        latents = self.encode_media(canvases[:, :, None]).mean[:, :, 0]  # (K, z, h, w)
        block = torch.zeros(latents.shape[0], MASK_CHANNELS, *latents.shape[-2:], device=latents.device)
        block[:, 0] = F.interpolate(masks[:, None].float(), size=latents.shape[-2:], mode="nearest")[:, 0].to(latents.device)
        return torch.cat([block, latents], dim=1)

    def slot_shape(self, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
        """(4 + z, h, w) of one reference slot for a video of this size."""
        height, width = height or self.resolution, width or self.resolution
        return (MASK_CHANNELS + self.denoiser.config.out_channels, height // self.spatial_factor,
                width // self.spatial_factor)

    def _zero_video_condition(self, frames: int, h: int, w: int) -> torch.Tensor:
        """(1, 4 + z, frames, h, w): the video part's condition, a zero mask and the VAE latents of an
        all-zero video (computed once per shape)."""
        key = (frames, h, w)
        if key not in self._zero_video:
            pixels = torch.zeros(1, 3, (frames - 1) * self.temporal_factor + 1, h * self.spatial_factor,
                                 w * self.spatial_factor)
            latents = self.encode_media(pixels).mean
            mask = torch.zeros(1, MASK_CHANNELS, *latents.shape[2:], device=latents.device)
            self._zero_video[key] = torch.cat([mask, latents], dim=1)
        return self._zero_video[key]

    def i2v_input(self, noisy: torch.Tensor, condition: VideoCondition) -> torch.Tensor:
        """The denoiser's 36-channel input for video latents (B, z, F, h, w): zeros at the S slot frames
        before the video's frames, then the condition channels [reference slots | the video part's]."""
        batch, channels, frames, h, w = noisy.shape
        if tuple(condition.slot_latents.shape[-2:]) != (h, w):
            raise UserError(f"the references were encoded for a {tuple(condition.slot_latents.shape[-2:])} latent grid, "
                            f"the video is {(h, w)}: render at the backbone's resolution ({self.resolution})")
        slots = rows_for(condition.slot_latents.to(noisy.device, noisy.dtype), batch).transpose(1, 2)
        video = self._zero_video_condition(frames, h, w).to(noisy.device, noisy.dtype)
        condition_channels = torch.cat([slots, video.expand(batch, -1, -1, -1, -1)], dim=2)
        padded = torch.cat([noisy.new_zeros(batch, channels, condition.slots, h, w), noisy], dim=2)
        return torch.cat([padded, condition_channels], dim=1)

    def _set_latent_geometry(self) -> None:
        config = self.vae.config
        self.latents_mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(config.latents_std).view(1, -1, 1, 1, 1)
        self.spatial_factor = 2 ** sum(1 for _ in config.dim_mult[1:])
        self.temporal_factor = 2 ** sum(config.temperal_downsample)

    def input_embedding(self):
        # UMT5EncoderModel ties `shared` and `encoder.embed_tokens` by weight, but forward calls the latter.
        return self.text_encoder.encoder.embed_tokens

    def _tokenizer_has_bos(self) -> bool:
        return False

    def _install_attention_processors(self) -> list[AttentionSite]:
        sites, processors = [], {}
        for name in self.denoiser.attn_processors:
            module_name = name.rsplit(".processor", 1)[0]
            module = self.denoiser.get_submodule(module_name)
            block_index = int(module_name.split(".")[1])  # blocks.<i>.attn1 / attn2
            kind = "cross" if module_name.endswith("attn2") else "self"
            inner = module.inner_dim
            site = AttentionSite(name=module_name, kind=kind, block_index=block_index, query_dim=inner,
                                 context_dim=inner, heads=module.heads, token_axis="spatiotemporal")
            sites.append(site)
            if kind == "cross" and self.task == "i2v":
                processors[name] = WanAttnProcessor(site, self.hooks, image_context_length=self.image_rows,
                                                    key_padding=self._key_padding)
            else:
                processors[name] = WanAttnProcessor(site, self.hooks)
        self.denoiser.set_attn_processor(processors)
        return sites

    def encode_tokens(self, tokenized: TokenizedPrompts) -> torch.Tensor:
        device = self.text_encoder.device
        # UMT5 has no absolute positions and masks padding keys, so the real tokens' states do not depend
        # on how much padding follows: encode only up to the longest prompt (a few dozen of the 512
        # positions) and zero-pad afterwards. As WanPipeline: positions past each prompt's length are
        # zeros, not encoder outputs. The mask is read on the host (tokenizer output), so no device sync.
        full_mask = tokenized.attention_mask
        real = full_mask.bool().any(dim=0).nonzero()
        length = int(real.max()) + 1 if len(real) else 1
        mask = full_mask[:, :length].to(device)
        hidden = self.text_encoder(tokenized.input_ids[:, :length].to(device), attention_mask=mask).last_hidden_state
        hidden = hidden * mask.unsqueeze(-1).to(hidden.dtype)
        return torch.nn.functional.pad(hidden, (0, 0, 0, full_mask.shape[1] - length))

    def encode_text(self, texts: list[str], unconditional: list[bool] | None = None):
        """T5 rows; under a VideoCondition with a text prefix (i2v: BindWeave's MLLM rows), [prefix | T5]
        per text, the prefixes zero-padded to the longest and their padding masked out of attention.
        `unconditional` marks the negative rows of a guided batch (default: none)."""
        context, tokenized = super().encode_text(texts)
        condition = self.condition() if self.task == "i2v" else None
        if condition is None or condition.text_prefix is None:
            self._key_padding.valid = None
            return context, tokenized
        prefixes = condition.text_prefix(list(texts), list(unconditional or [False] * len(texts)))
        length = max(p.shape[0] for p in prefixes)
        rows = context.new_zeros(len(texts), length, context.shape[-1])
        valid = torch.zeros(len(texts), length, dtype=torch.bool, device=context.device)
        for i, prefix in enumerate(prefixes):
            rows[i, : prefix.shape[0]] = prefix.to(rows.dtype)
            valid[i, : prefix.shape[0]] = True
        # Text-attention keys: the image context's rows past the split, then [prefix | T5].
        after_split = condition.image_context.shape[1] - self.image_rows
        self._key_padding.valid = torch.cat([valid.new_ones(len(texts), after_split), valid,
                                             valid.new_ones(len(texts), context.shape[1])], dim=1)
        return torch.cat([rows, context], dim=1), tokenized

    def guided_context(self, prompts: list[str], negative_prompt: str) -> torch.Tensor:
        """i2v under a text prefix: negatives and prompts in one encode_text call, so both halves are padded
        to one length (the negative rows get their own prefix pass, e.g. BindWeave's MLLM on the negative
        prompt with the same references)."""
        condition = self.condition() if self.task == "i2v" else None
        if condition is None or condition.text_prefix is None:
            return super().guided_context(prompts, negative_prompt)
        n = len(prompts)
        context, tokenized = self.encode_text([negative_prompt] * n + list(prompts), [True] * n + [False] * n)
        self.hooks.declare_rows(ContextRows.guided(tokenized.rows(slice(0, n)), tokenized.rows(slice(n, 2 * n))))
        return context

    def encode_media(self, pixels: torch.Tensor, batch_size: int = 4) -> LatentDistribution:
        frames = pixels.shape[2]
        if (frames - 1) % self.temporal_factor != 0:
            raise UserError(f"wan21 needs 1 + {self.temporal_factor}k frames per clip, got {frames}; set data.frames")
        means, stds = [], []
        mean, std = self.latents_mean.to(self.device), self.latents_std.to(self.device)
        with torch.no_grad():
            for chunk in pixels.split(batch_size):
                dist = self.vae.encode(chunk.to(self.device, self.vae_dtype)).latent_dist
                means.append(((dist.mean.float() - mean) / std))
                stds.append(dist.std.float() / std)
        return LatentDistribution(torch.cat(means), torch.cat(stds))

    def _shift(self, sigma: torch.Tensor, shift: float) -> torch.Tensor:
        return shift * sigma / (1 + (shift - 1) * sigma)

    def make_noisy(self, latents, generator, timesteps=None) -> NoisyBatch:
        n = latents.shape[0]
        if timesteps is None:
            sigma = self._shift(torch.rand((n,), generator=generator), self.train_shift)
        else:
            sigma = timesteps.float().cpu() / 1000.0
        sigma = sigma.to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        s = sigma.view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1 - s) * latents + s * noise
        return NoisyBatch(noisy=noisy, timesteps=sigma * 1000.0, target=noise - latents)

    def predicted_clean(self, model_input, timesteps, prediction):
        # Flow matching: x_t = (1 - s) x0 + s noise, the prediction is noise - x0, s = t / 1000.
        sigma = (timesteps.float() / 1000.0).to(model_input.device).view(-1, *([1] * (model_input.ndim - 1)))
        return model_input - sigma * prediction

    def denoise(self, noisy, timesteps, context):
        # Frozen weights may be bf16/fp16 while latents and learned tokens stay fp32.
        if self.task != "i2v":
            return self.denoiser(hidden_states=noisy.to(self.dtype), timestep=timesteps,
                                 encoder_hidden_states=context.to(self.dtype)).sample
        if self.layout_only:
            raise UserError("this full-size wan21_i2v was built on the meta device (weights=random without a GPU): "
                            "a layout for memory_estimate, it cannot run here")
        condition = self._active_condition(noisy)
        image = rows_for(condition.image_context, noisy.shape[0]).to(noisy.device, self.dtype)
        prediction = self.denoiser(hidden_states=self.i2v_input(noisy, condition).to(self.dtype), timestep=timesteps,
                                   encoder_hidden_states=context.to(self.dtype),
                                   encoder_hidden_states_image=image).sample
        return prediction[:, :, condition.slots:]  # the slot frames' output is dropped

    def sampling_scheduler(self, name: str | None):
        from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

        name = name or self.default_scheduler
        if name == "unipc":
            return UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                           flow_shift=self.sample_shift, num_train_timesteps=1000)
        if name == "euler":
            return FlowMatchEulerDiscreteScheduler(shift=self.sample_shift, num_train_timesteps=1000)
        raise UserError(f"scheduler {name!r} is not available for wan21: use unipc or euler")

    def initial_latents(self, n, height, width, frames, generator):
        if (frames - 1) % self.temporal_factor != 0:
            raise UserError(f"frames must be 1 + {self.temporal_factor}k for wan21, got {frames}")
        shape = (n, self.denoiser.config.out_channels, (frames - 1) // self.temporal_factor + 1,
                 height // self.spatial_factor, width // self.spatial_factor)
        return torch.randn(shape, generator=generator)

    @torch.no_grad()
    def decode(self, latents):
        latents = latents * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        video = self.vae.decode(latents.to(self.vae_dtype)).sample.float()
        return ((video.clamp(-1, 1) + 1) / 2).cpu()


def image_to_video_config(config, image_dim: int) -> dict:
    """A text-to-video WanTransformer3DModel config in Wan2.1-I2V's layout: 20 more input channels, a
    CLIP image context of width `image_dim`, image K/V projections of the model's width."""
    config = {k: v for k, v in dict(config).items() if not k.startswith("_")}
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    return {**config, "in_channels": config["in_channels"] + I2V_EXTRA_CHANNELS, "image_dim": image_dim,
            "added_kv_proj_dim": inner}


def image_to_video_denoiser(t2v, image_dim: int):
    """Grow a trained text-to-video transformer into Wan2.1-I2V's layout so that it starts as exactly the
    model it was: the new input channels' patch-embedding weights and the image value projections are
    zero (the image attention adds nothing until trained); the image embedder and key projections get
    the seeded random init (caller's RNG)."""
    from diffusers import WanTransformer3DModel

    i2v = WanTransformer3DModel(**image_to_video_config(t2v.config, image_dim)).to(next(t2v.parameters()).dtype)
    state = t2v.state_dict()
    patch = state.pop("patch_embedding.weight")
    missing, unexpected = i2v.load_state_dict(state, strict=False)
    if unexpected:
        raise ValueError(f"unexpected keys growing the text-to-video denoiser: {unexpected[:3]}")
    with torch.no_grad():
        weight = torch.zeros_like(i2v.patch_embedding.weight)
        weight[:, : patch.shape[1]] = patch
        i2v.patch_embedding.weight.copy_(weight)
        for block in i2v.blocks:
            block.attn2.add_v_proj.weight.zero_()
            block.attn2.add_v_proj.bias.zero_()
    return i2v


BACKBONE = Wan21Backbone
