"""Stable Diffusion 1.5: UNet2DConditionModel + AutoencoderKL + CLIP text encoder, epsilon objective."""

from __future__ import annotations

import torch

from conceptkit.attention import AttentionSite, UNetAttnProcessor
from conceptkit.backbones.base import Backbone, LatentDistribution, NoisyBatch
from conceptkit.errors import UserError
from conceptkit.tokens import TokenizedPrompts

# Full-size SD1.5 architecture, for `weights=random` (speed/memory benchmarks without downloads).
SD15_UNET_CONFIG = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SD15_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
)
SD15_TEXT_CONFIG = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu",
)
SD15_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    prediction_type="epsilon", clip_sample=False, steps_offset=1,
)
# The ShapeWorld toy departs from SD1.5's objective: with SD1.5's schedule the last timestep keeps
# ~7 % of the signal, and on a small latent grid (measured on 8x8) the mean of the starting noise is large enough
# that the sampler reads the image's average colour (the background) from the noise instead of the
# prompt (measured: backgrounds followed the seed, not the prompt). Zero terminal SNR with
# v-prediction and trailing timesteps (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
# Steps are Flawed"; SD2.x's v objective) starts sampling from pure noise the model was trained on.
SHAPES_SCHEDULER_CONFIG = dict(SD15_SCHEDULER_CONFIG, prediction_type="v_prediction", rescale_betas_zero_snr=True,
                               timestep_spacing="trailing")


class SD15Backbone(Backbone):
    family = "sd15"
    lora_prefix = "unet"  # diffusers' LoRA file key prefix for this denoiser
    RESOLUTIONS = {"full": 512, "shapes": 64, "tiny": 32}

    def __init__(self, *, architecture: str = "full", weights: str = "pretrained",
                 pretrained: str = "stable-diffusion-v1-5/stable-diffusion-v1-5",
                 path: str | None = None, revision: str | None = None, dtype: str = "float32",
                 resolution: int | None = None, max_text_tokens: int = 77, seed: int = 0,
                 default_scheduler: str = "dpm++", image_encoder: str | None = None):
        super().__init__(architecture=architecture, weights=weights, pretrained=pretrained, path=path,
                         revision=revision, dtype=dtype, resolution=resolution, max_text_tokens=max_text_tokens,
                         seed=seed)
        self.default_scheduler = default_scheduler
        self.image_encoder_name = image_encoder  # None: the architecture's default (image_encoder_source)

    def config(self) -> dict:
        return dict(architecture=self.architecture, weights=self.weights, pretrained=self.pretrained, path=self.path,
                    revision=self.revision,
                    dtype=self.dtype_name, resolution=self.resolution, max_text_tokens=self.max_text_tokens,
                    seed=self.seed, default_scheduler=self.default_scheduler, image_encoder=self.image_encoder_name)

    def _pretrained_image_encoder(self) -> str:
        return "h94/IP-Adapter:models/image_encoder"  # the ViT-H/14 IP-Adapter-Plus for SD1.5 conditions on

    def auxiliary_default(self, kind: str) -> str:
        """Compositional guidance's segmenter and identity encoder: CLIPSeg and DINOv2 (the paper's
        matcher) for real weights; the oracle's components and the toy's own image encoder on ShapeWorld;
        test-size random models for tiny and for weights=random (their cost is not what a full-size
        speed run measures: the UNet and VAE passes are)."""
        if self.architecture == "shapes":
            return {"segmenter": "oracle", "identity": "image_encoder"}[kind]
        if self.architecture == "tiny" or self.weights == "random":
            return {"segmenter": "random:clipseg-tiny", "identity": "random:dinov2-tiny"}[kind]
        return {"segmenter": "CIDAS/clipseg-rd64-refined", "identity": "facebook/dinov2-base"}[kind]

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] on the device, differentiable with respect to the latents."""
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample.float()
        return (images.clamp(-1, 1) + 1) / 2

    def _build_random_modules(self) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        from conceptkit.backbones import tiny, toy

        if self.architecture == "tiny":
            self.tokenizer, self.text_encoder, self.denoiser, self.vae = tiny.tiny_sd15_modules(self.seed)
        elif self.architecture == "shapes":
            self.tokenizer, self.text_encoder, self.denoiser, self.vae = toy.shapes_sd15_modules(self.seed)
        else:
            self.tokenizer = tiny.build_tiny_clip_tokenizer()  # ids only need to be < the vocabulary size
            self.text_encoder = CLIPTextModel(CLIPTextConfig(**SD15_TEXT_CONFIG))
            self.denoiser = UNet2DConditionModel(**SD15_UNET_CONFIG)
            self.vae = AutoencoderKL(**SD15_VAE_CONFIG)
        self.train_scheduler = DDPMScheduler(**(SHAPES_SCHEDULER_CONFIG if self.architecture == "shapes"
                                                else SD15_SCHEDULER_CONFIG))
        self._set_latent_geometry()

    def _load_pretrained_modules(self, source: str) -> None:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        kw = {"revision": self.revision}
        model_kw = {**kw, "torch_dtype": self.dtype}
        try:
            self.tokenizer = CLIPTokenizer.from_pretrained(source, subfolder="tokenizer", **kw)
            self.text_encoder = CLIPTextModel.from_pretrained(source, subfolder="text_encoder", **model_kw)
            self.denoiser = UNet2DConditionModel.from_pretrained(source, subfolder="unet", **model_kw)
            self.vae = AutoencoderKL.from_pretrained(source, subfolder="vae", **model_kw)
            self.train_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler", **kw)
        except (OSError, ValueError) as error:
            raise self._missing_weights(error) from None
        self._set_latent_geometry()

    def _set_latent_geometry(self) -> None:
        self.scaling_factor = float(getattr(self.vae.config, "scaling_factor", 0.18215))
        self.latent_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _tokenizer_has_bos(self) -> bool:
        return True

    def _install_attention_processors(self) -> list[AttentionSite]:
        sites, processors = [], {}
        names = list(self.denoiser.attn_processors)  # registration order: down blocks, up blocks, then mid
        for index, name in enumerate(names):
            module = self.denoiser.get_submodule(name.rsplit(".processor", 1)[0])
            kind = "cross" if module.is_cross_attention else "self"
            site = AttentionSite(name=name.rsplit(".processor", 1)[0], kind=kind, block_index=index,
                                 query_dim=module.query_dim, context_dim=module.cross_attention_dim,
                                 heads=module.heads, token_axis="spatial")
            sites.append(site)
            processors[name] = UNetAttnProcessor(site, self.hooks)
        self.denoiser.set_attn_processor(processors)
        return sites

    def encode_tokens(self, tokenized: TokenizedPrompts) -> torch.Tensor:
        ids = tokenized.input_ids.to(self.text_encoder.device)
        # SD1.5 conditions on the last hidden state of the full padded sequence, no attention mask.
        return self.text_encoder(ids).last_hidden_state

    def encode_media(self, pixels: torch.Tensor, batch_size: int = 8) -> LatentDistribution:
        if pixels.shape[2] != 1:
            raise UserError("sd15 trains on images; video clips need backbone=wan21 (or pass frames as images)")
        means, stds = [], []
        with torch.no_grad():
            for chunk in pixels[:, :, 0].split(batch_size):
                dist = self.vae.encode(chunk.to(self.device, self.dtype)).latent_dist
                means.append(dist.mean.float() * self.scaling_factor)
                stds.append(dist.std.float() * self.scaling_factor)
        return LatentDistribution(torch.cat(means), torch.cat(stds))

    def make_noisy(self, latents, generator, timesteps=None) -> NoisyBatch:
        n = latents.shape[0]
        if timesteps is None:
            timesteps = torch.randint(0, self.train_scheduler.config.num_train_timesteps, (n,), generator=generator)
        timesteps = timesteps.to(latents.device)
        noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        noisy = self.train_scheduler.add_noise(latents, noise, timesteps)
        if self.train_scheduler.config.prediction_type == "v_prediction":
            target = self.train_scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return NoisyBatch(noisy=noisy, timesteps=timesteps, target=target)

    def predicted_clean(self, model_input, timesteps, prediction):
        # The denoiser's input is x_t = sqrt(a) x0 + sqrt(1 - a) eps (the samplers' scale_model_input
        # maps their own latents there), a = alphas_cumprod[t].
        alphas = self.train_scheduler.alphas_cumprod[timesteps.long().cpu()].float()
        alphas = alphas.to(model_input.device).view(-1, *([1] * (model_input.ndim - 1)))
        if self.train_scheduler.config.prediction_type == "v_prediction":
            return alphas.sqrt() * model_input - (1 - alphas).sqrt() * prediction
        return (model_input - (1 - alphas).sqrt() * prediction) / alphas.sqrt()

    def denoise(self, noisy, timesteps, context):
        # Frozen weights may be bf16/fp16 while latents and learned tokens stay fp32.
        return self.denoiser(noisy.to(self.dtype), timesteps, encoder_hidden_states=context.to(self.dtype)).sample

    def sampling_scheduler(self, name: str | None):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

        name = name or self.default_scheduler
        config = self.train_scheduler.config
        if name == "ddim":
            return DDIMScheduler.from_config(config)
        if name in ("dpm++", "dpmsolver++", "dpm"):
            return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++")
        if name == "euler":
            return EulerDiscreteScheduler.from_config(config)
        raise UserError(f"scheduler {name!r} is not available for sd15: use ddim, dpm++ or euler")

    def initial_latents(self, n, height, width, frames, generator):
        channels = self.denoiser.config.in_channels
        shape = (n, channels, height // self.latent_factor, width // self.latent_factor)
        return torch.randn(shape, generator=generator)

    @torch.no_grad()
    def decode(self, latents):
        images = self.vae.decode((latents / self.scaling_factor).to(self.dtype)).sample.float()
        return ((images.clamp(-1, 1) + 1) / 2).unsqueeze(2).cpu()


BACKBONE = SD15Backbone
