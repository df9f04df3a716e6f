"""Wan2.1 text-to-video: WanTransformer3DModel + AutoencoderKLWan + UMT5 encoder, flow matching.

Images train as one-frame videos. Training follows rectified flow: x_t = (1 - s) x_0 + s * eps,
target = eps - x_0, with s drawn uniformly and shifted (shift 5 as in DiffSynth's Wan training,
which the BiCo code uses; DiffSynth's Gaussian-bump loss weighting over timesteps is not applied);
sampling defaults to UniPC with flow shift 3 and CFG 5 (Wan's 480p defaults).
"""

from __future__ import annotations

import torch

from conceptkit.attention import AttentionSite, WanAttnProcessor
from conceptkit.backbones.base import Backbone, LatentDistribution, NoisyBatch
from conceptkit.errors import UserError
from conceptkit.tokens import TokenizedPrompts

WAN13B_TRANSFORMER_CONFIG = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
)
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
                 default_scheduler: str = "unipc"):
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

    def config(self) -> dict:
        return dict(architecture=self.architecture, weights=self.weights, pretrained=self.pretrained, path=self.path,
                    revision=self.revision,
                    dtype=self.dtype_name, resolution=self.resolution, max_text_tokens=self.max_text_tokens,
                    seed=self.seed, frames=self.default_frames, fps=self.fps, train_shift=self.train_shift,
                    sample_shift=self.sample_shift, default_scheduler=self.default_scheduler)

    def _build_random_modules(self) -> None:
        from diffusers import AutoencoderKLWan, WanTransformer3DModel
        from transformers import UMT5Config, UMT5EncoderModel

        from conceptkit.backbones import tiny, toy

        if self.architecture == "tiny":
            self.tokenizer, self.text_encoder, self.denoiser, self.vae = tiny.tiny_wan21_modules(self.seed)
        elif self.architecture == "shapes":
            self.tokenizer, self.text_encoder, self.denoiser, self.vae = toy.shapes_wan21_modules(self.seed)
        else:
            self.tokenizer = tiny.build_tiny_t5_tokenizer(self.max_text_tokens)
            self.text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL_CONFIG))
            self.denoiser = WanTransformer3DModel(**WAN13B_TRANSFORMER_CONFIG)
            self.vae = AutoencoderKLWan()
        self._set_latent_geometry()

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
        self._set_latent_geometry()

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
        return self.denoiser(hidden_states=noisy.to(self.dtype), timestep=timesteps,
                             encoder_hidden_states=context.to(self.dtype)).sample

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
        shape = (n, self.denoiser.config.in_channels, (frames - 1) // self.temporal_factor + 1,
                 height // self.spatial_factor, width // self.spatial_factor)
        return torch.randn(shape, generator=generator)

    @torch.no_grad()
    def decode(self, latents):
        latents = latents * self.latents_std.to(latents.device) + self.latents_mean.to(latents.device)
        video = self.vae.decode(latents.to(self.vae_dtype)).sample.float()
        return ((video.clamp(-1, 1) + 1) / 2).cpu()


BACKBONE = Wan21Backbone
