"""A non-editable install ships everything the editable one reads, and composes the same configs.

`pip install .` once dropped conf/budget (pyproject listed every config group but that one); Hydra's
`optional budget:` then found nothing and `conceptkit train` silently fell back to the official budget,
which learns nothing on the toy. So nothing here is hard-coded: the packages, config groups, assets and
method cards expected in the wheel are enumerated from the checkout.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> where it lands in the installed package (pyproject's package-dir).
LAYOUT = {ROOT / "src" / "conceptkit": "conceptkit", ROOT / "methods": "conceptkit/methods", ROOT / "conf": "conceptkit/conf"}


def _source_files() -> dict[str, Path]:
    """Installed relative path -> checkout file, for every file a wheel must carry: modules, every conf
    group's yaml, every asset, every method card."""
    files = {}
    for folder, prefix in LAYOUT.items():
        for path in folder.rglob("*"):
            if not path.is_file() or "__pycache__" in path.parts:
                continue
            rel = path.relative_to(folder)
            wanted = (path.suffix == ".py" or (folder.name == "conf" and path.suffix == ".yaml")
                      or (folder.name == "methods" and rel.name == "README.md" and len(rel.parts) == 2)
                      or rel.parts[0] == "assets")
            if wanted:
                files[f"{prefix}/{rel.as_posix()}"] = path
    return files


def _source_packages() -> set[str]:
    packages = set()
    for folder, prefix in LAYOUT.items():
        for init in folder.rglob("__init__.py"):
            packages.add(".".join([*prefix.split("/"), *init.parent.relative_to(folder).parts]))
    return packages


def _budget_pairs() -> list[list[str]]:
    """Overrides selecting each conf/budget/<method>_<backbone>.yaml, plus the embedded default (none)."""
    methods = [p.stem for p in (ROOT / "conf" / "method").glob("*.yaml")]
    backbones = [p.stem for p in (ROOT / "conf" / "backbone").glob("*.yaml")]
    pairs = [[]]
    for budget in sorted((ROOT / "conf" / "budget").glob("*.yaml")):
        match = [(m, b) for m in methods for b in backbones if f"{m}_{b}" == budget.stem]
        assert len(match) == 1, f"conf/budget/{budget.name} names no single <method>_<backbone>"
        pairs.append([f"method={match[0][0]}", f"backbone={match[0][1]}"])
    return pairs


# Run once by the editable install and once by the wheel; prints one JSON object. Composes the train
# config the way `conceptkit train` does (conceptkit.cli._run -> conceptkit.config.compose("train", ...)).
PROBE = """
import json, sys
from importlib import resources
import pytest
from omegaconf import OmegaConf
import conceptkit, conceptkit.methods, conceptkit.config as c, conceptkit.registry as r, conceptkit.data as d
from conceptkit.backbones.base import shipped_weights_folder as w
out = {"package": str(resources.files("conceptkit")), "conf": str(c.conf_dir()),
       "methods_path": [str(p) for p in conceptkit.methods.__path__], "sys_path": sys.path,
       "meta_path": [repr(f) for f in sys.meta_path], "method_names": r.method_names(),
       "examples": sorted(p.name for p in d.bundled_examples().iterdir()),
       "weights": {n: str(w(n)) for n in ("sd15_shapes", "wan21_shapes")},
       "lora_target": c.compose("train", ["method=lora"]).method._target_,
       "train": {" ".join(o): OmegaConf.to_container(c.compose("train", o), resolve=True) for o in OVERRIDES}}
print(json.dumps(out))
"""


def _probe(python_args: list[str], prelude: str, cwd: Path, overrides: list[list[str]]) -> subprocess.Popen:
    code = prelude + f"OVERRIDES = {overrides!r}\n" + PROBE
    return subprocess.Popen([sys.executable, *python_args, "-c", code], cwd=cwd, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _result(process: subprocess.Popen) -> dict:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-2000:]
    return json.loads(stdout.splitlines()[-1])


def test_pyproject_lists_every_package_folder():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    missing, extra = _source_packages() - listed, listed - _source_packages()
    assert not missing and not extra, f"pyproject.toml packages: add {sorted(missing)}, remove {sorted(extra)}"


def _build_install_and_probe(tmp_path: Path, overrides: list[list[str]]) -> dict:
    """Build the wheel, install it under tmp_path/site, and run the probe from that copy alone."""
    # Build from a copy of what the wheel is made of, so a stale build/ in the checkout cannot add files.
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source / name)
    for folder in ("src", "methods", "conf"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "dist"), str(source)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("conceptkit-*.whl"))
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile", "-q", "--target",
                    str(target), str(wheel)], check=True, capture_output=True)
    # -S: no .pth files, so no editable finder; the wheel's copy first, then the dependencies' folders.
    site_packages = [p for p in sys.path if "site-packages" in p and not p.startswith(str(ROOT))]
    return _result(_probe(["-S"], f"import sys; sys.path[:0] = [{str(target)!r}] + {site_packages!r}\n",
                          tmp_path, overrides))


def test_wheel_ships_what_the_checkout_has_and_composes_the_same_budget(tmp_path):
    overrides = _budget_pairs()
    editable = _probe([], "", tmp_path, overrides)  # the editable install's answer, computed while the wheel builds
    try:
        installed = _build_install_and_probe(tmp_path, overrides)
    except BaseException:
        editable.kill()
        raise
    editable = _result(editable)
    target = tmp_path / "site"

    # Imported from the wheel, not from the checkout.
    for key in ("package", "conf"):
        assert installed[key].startswith(str(target)), (key, installed[key])
    assert all(p.startswith(str(target)) for p in installed["methods_path"]), installed["methods_path"]
    assert all(str(w).startswith(str(target)) for w in installed["weights"].values())
    assert not any(p.startswith(str(ROOT)) for p in installed["sys_path"] if p), installed["sys_path"]
    assert not any("editable" in f.lower() for f in installed["meta_path"]), installed["meta_path"]

    # Every module, conf group with all its yaml, asset and method card, byte for byte.
    expected = _source_files()
    groups = {p.name for p in (ROOT / "conf").iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert "budget" in groups
    for group in groups:
        assert any(rel.startswith(f"conceptkit/conf/{group}/") and rel.endswith(".yaml") for rel in expected), group
    assert sum(rel.startswith("conceptkit/methods/") and rel.endswith("/README.md") for rel in expected) \
        == len([p for p in (ROOT / "methods").iterdir() if (p / "__init__.py").is_file()])
    missing = sorted(rel for rel in expected if not (target / rel).is_file())
    assert not missing, f"the wheel lacks {missing}"
    differ = sorted(rel for rel, path in expected.items() if (target / rel).read_bytes() != path.read_bytes())
    assert not differ, f"the wheel's copies differ: {differ}"

    # The same methods, examples, and composed train configs (budget included) as the editable install.
    for key in ("method_names", "examples", "lora_target"):
        assert installed[key] == editable[key], key
    for label, cfg in editable["train"].items():
        for section, value in cfg.items():
            assert installed["train"][label][section] == value, \
                f"`conceptkit train {label}`: the wheel composes another {section} ({installed['train'][label][section]})"
    assert installed["method_names"] == sorted(p.parent.name for p in (ROOT / "methods").glob("*/__init__.py"))
    assert installed["lora_target"] == "conceptkit.methods.lora.DreamBoothLoRA"
    for pair in overrides[1:]:
        budget = OmegaConf.load(ROOT / "conf" / "budget" / f"{pair[0][7:]}_{pair[1][9:]}.yaml")
        composed = installed["train"][" ".join(pair)]
        for key, value in budget.method.items():
            assert composed["method"][key] == value, (pair, key)
    # The embedded default (`conceptkit train`, no arguments) is one of them.
    defaults = {k: v for d in OmegaConf.to_container(OmegaConf.load(ROOT / "conf" / "train.yaml").defaults)
                if isinstance(d, dict) for k, v in d.items()}
    default_pair = [f"method={defaults['method']}", f"backbone={defaults['backbone']}"]
    assert default_pair in overrides, "the embedded default has no conf/budget file (the toy needs one)"
    assert installed["train"][""] == installed["train"][" ".join(default_pair)]
