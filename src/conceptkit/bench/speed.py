"""`conceptkit bench`: training-step time and peak memory for each method x backbone.

Each pair runs in its own subprocess (`python -m conceptkit.bench.speed <json>`), so one pair's memory
never inflates another's. Inside, the method's real training step (its `training_loss`, backward,
clipping, AdamW step, with the stage's gradient accumulation) is timed after warm-up steps; the
Lightning loop around it is left out. Writes results.json, results.md and report.html (the table
and bar charts of step time and memory). Memory: on CUDA the allocator's peak during the timed steps;
on CPU the process's peak resident set sampled every 2 ms during the timed steps, and that peak
minus the resident set just before them (what the steps themselves need).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from conceptkit.errors import UserError

RESULTS_VERSION = 1


class _RssSampler:
    def __init__(self):
        import psutil

        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()

    def __enter__(self):
        self.baseline = self.process.memory_info().rss
        self.peak = self.baseline
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def measure_pair(method_name: str, backbone_name: str, steps: int, warmup: int, device: str,
                 precision: str, overrides: list[str] = ()) -> list[dict]:
    import torch
    from hydra.utils import instantiate

    from conceptkit.config import compose
    from conceptkit.method import TrainBatch
    from conceptkit.training.module import batch_indices, micro_step_generator
    from conceptkit.training.run import prepare_data

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = compose("train", [f"method={method_name}", f"backbone={backbone_name}", "name=bench", *overrides])
    backbone = instantiate(cfg.backbone).load().to(device)
    method = instantiate(cfg.method, concept_name="bench")
    data = prepare_data(cfg, backbone)
    data.latents = data.latents.to(device)
    method.initialize(backbone, data)
    method.attach(backbone)
    method.to(device)
    autocast_dtype = {"32": None, "bf16": torch.bfloat16, "16": torch.float16}[precision]
    records = []
    for stage_index, stage in enumerate(method.stages(backbone)):
        method.begin_stage(stage, backbone)
        stage_data = method.stage_data(stage, data)
        params = [p for g in method.param_groups(stage) for p in g["params"]]
        optimizer = torch.optim.AdamW(params, lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
        micro = 0

        def optimizer_step():
            nonlocal micro
            for _ in range(stage.accumulate):
                batch = TrainBatch(indices=batch_indices(0, stage_index, micro, stage.batch_size, stage_data.count),
                                   data=stage_data, generator=micro_step_generator(0, stage_index, micro))
                with torch.autocast(device_type=device, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                    loss = method.training_loss(batch, backbone, stage)["loss"]
                (loss / stage.accumulate).backward()
                micro += 1
            if stage.grad_clip:
                torch.nn.utils.clip_grad_norm_(params, stage.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(warmup):
            optimizer_step()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        sampler = _RssSampler()
        with sampler:
            start = time.perf_counter()
            for _ in range(steps):
                optimizer_step()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / steps
        record = {
            "method": method_name, "backbone": backbone_name, "stage": stage.name, "device": device,
            "precision": precision, "batch_size": stage.batch_size, "accumulate": stage.accumulate,
            "step_seconds": round(seconds, 5), "micro_step_seconds": round(seconds / stage.accumulate, 5),
            "trainable_params": sum(p.numel() for p in params),
            "timed_steps": steps,
        }
        if device == "cuda":
            record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            record["memory_kind"] = "cuda max allocated"
        else:
            record["peak_memory_mb"] = round(sampler.peak / 2**20, 1)
            record["step_memory_mb"] = round((sampler.peak - sampler.baseline) / 2**20, 1)
            record["memory_kind"] = "process peak RSS"
        records.append(record)
    return records


def _table(rows: list[dict]) -> str:
    header = "| backbone | method | stage | device | step s | micro-step s | peak MB | step MB | trainable |"
    lines = [header, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['backbone']} | {r['method']} | {r['stage']} | {r['device']} | {r['step_seconds']:.4f} | "
                     f"{r['micro_step_seconds']:.4f} | {r['peak_memory_mb']} | {r.get('step_memory_mb', '-')} | "
                     f"{r['trainable_params']:,} |")
    return "\n".join(lines)


def run_bench(cfg) -> Path:
    from conceptkit.config import group_options
    from conceptkit.registry import method_names

    for name in cfg.methods:
        if name not in method_names():
            raise UserError(f"methods: unknown method {name!r}; choose from {', '.join(method_names())}")
    for name in cfg.backbones:
        if name not in group_options("backbone"):
            raise UserError(f"backbones: unknown backbone {name!r}; choose from {', '.join(group_options('backbone'))}")
    output = Path(cfg.output)
    rows: list[dict] = []
    pairs = [(b, m) for b in cfg.backbones for m in cfg.methods]
    for number, (backbone_name, method_name) in enumerate(pairs, 1):
        print(f"[{number}/{len(pairs)}] {method_name} on {backbone_name} ...", flush=True)
        request = json.dumps({"method": method_name, "backbone": backbone_name, "steps": cfg.steps,
                              "warmup": cfg.warmup, "device": cfg.device, "precision": cfg.precision,
                              "overrides": list(cfg.overrides)})
        done = subprocess.run([sys.executable, "-m", "conceptkit.bench.speed", request], capture_output=True, text=True,
                              env={**os.environ, "PYTHONWARNINGS": "ignore"})
        if done.returncode != 0:
            tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"bench of {method_name} on {backbone_name} failed: {tail}")
        rows.extend(json.loads(done.stdout.strip().splitlines()[-1]))
    import torch

    results = {
        "version": RESULTS_VERSION, "kind": "speed", "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "torch": torch.__version__,
                    "cuda_device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "settings": {"steps": cfg.steps, "warmup": cfg.warmup, "precision": cfg.precision,
                     "overrides": list(cfg.overrides)},
        "rows": rows,
    }
    output.mkdir(parents=True, exist_ok=True)
    (output / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    table = _table(rows)
    markdown = "# conceptkit bench: training step\n\n" + table + "\n"
    (output / "results.md").write_text(markdown)
    from conceptkit.bench.report import write_html_report

    write_html_report(output, "conceptkit bench: training step", markdown, speed_charts(rows))
    print(table)
    return output


def speed_charts(rows: list[dict]) -> list:
    """Step time and peak memory, one group per method/stage, one bar per backbone."""
    from conceptkit.bench.report import BarChart

    categories = list(dict.fromkeys(f"{r['method']}/{r['stage']}" for r in rows))
    backbones = list(dict.fromkeys(r["backbone"] for r in rows))

    def series(key):
        found = {(r["backbone"], f"{r['method']}/{r['stage']}"): r.get(key) for r in rows}
        return {b: [found.get((b, c)) for c in categories] for b in backbones}

    device = ", ".join(sorted({r["device"] for r in rows}))
    return [BarChart(f"optimiser step time ({device})", categories, series("step_seconds"), "seconds"),
            BarChart("peak memory", categories, series("peak_memory_mb"), "MB")]


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    result = measure_pair(args["method"], args["backbone"], args["steps"], args["warmup"], args["device"],
                          args["precision"], args.get("overrides", []))
    print(json.dumps(result))
