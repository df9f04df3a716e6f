"""A non-editable install finds the configs and the method folders too."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def test_wheel_ships_configs_methods_and_examples(tmp_path):
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(root)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("conceptkit-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = (
        "import conceptkit, conceptkit.config as c, conceptkit.registry as r, conceptkit.data as d;"
        "print(conceptkit.__file__); print(c.conf_dir()); print(r.method_names());"
        "print(sorted(p.name for p in d.bundled_examples().iterdir()));"
        "print(c.compose('train', ['method=lora']).method._target_);"
        "from conceptkit.backbones.base import shipped_weights_folder as w;"
        "print(sorted(p.relative_to(w('sd15_shapes')).as_posix() for p in w('sd15_shapes').rglob('*.*')));"
        "print(sorted(p.relative_to(w('wan21_shapes')).as_posix() for p in w('wan21_shapes').rglob('*.*')))"
    )
    done = subprocess.run([sys.executable, "-S", "-c", f"import sys; sys.path[:0] = [{str(target)!r}] + "
                           f"[p for p in {sys.path!r} if 'site-packages' in p]; " + code],
                          capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-1500:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith(str(target)) and lines[1].startswith(str(target))
    assert lines[2] == "['bico', 'conceptprism', 'lora', 'mcpl', 'textual_inversion']"
    assert "0_sky.png" in lines[3]
    assert lines[4] == "conceptkit.methods.lora.DreamBoothLoRA"
    for part in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "scheduler/scheduler_config.json",
                 "recipe.json", "README.md"):
        assert part in lines[5], part
    for part in ("transformer/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
                 "text_encoder/model.safetensors", "tokenizer/tokenizer.json", "recipe.json", "README.md"):
        assert part in lines[6], part
