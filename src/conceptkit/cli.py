"""The `conceptkit` command. Imports nothing heavy at import time: `conceptkit --help` stays fast."""

from __future__ import annotations

import sys

USAGE = """usage: conceptkit <command> [key=value ...]

commands:
  train     train a concept:    conceptkit train method=conceptprism backbone=sd15 data.images=<folder> output=<dir>
  compose   render concepts:    conceptkit compose concepts=[<dir>,<dir>] prompt="a photo of {a} and {b}" output=<dir>
  bench     step time / memory: conceptkit bench methods=[lora,conceptprism] backbones=[sd15_tiny]
            quality on the ShapeWorld: conceptkit bench suite=shapes_subject methods=[textual_inversion,lora,conceptprism]
  pretrain  ShapeWorld toy backbones: conceptkit pretrain backbone=sd15_shapes
            and their image encoder (encoder methods): conceptkit pretrain encoder=shapes_clip
            and their vision-language model (captions, prompts, MLLM states): conceptkit pretrain vlm=shapes_qwen25vl
  ls        list methods and backbones, and the concepts in a folder: conceptkit ls [folder]

Arguments are Hydra overrides of the configs in conf/ (train.yaml, compose.yaml, bench.yaml).
Add debug=true for full tracebacks.
"""


# Free-text values: `prompt={dog} on a beach` (or MCPL's `method.sentence=a {ball} and a {cube}`) would otherwise be read by Hydra's override grammar
# (a leading `{` starts a dict). They are passed on quoted, so users never have to nest quotes.
FREE_TEXT_KEYS = ("prompt", "negative_prompt", "sample.negative_prompt", "method.sentence")


def _quote_free_text(overrides: list[str]) -> list[str]:
    quoted = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key in FREE_TEXT_KEYS and not (len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""):
            value = "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        quoted.append(f"{key}{sep}{value}" if sep else override)
    return quoted


def _run(command: str, overrides: list[str]) -> int:
    from conceptkit.config import compose

    overrides = _quote_free_text(overrides)

    if command == "train":
        cfg = compose("train", overrides)
        from conceptkit.training.run import train

        output = train(cfg)
        print(f"concept written to {output}")
        from conceptkit.training.run import is_main_process

        if not is_main_process():
            return 0  # an extra data-parallel rank: the first process wrote the concept
        # The first sample prompt is worded for the backbone (the toys know only the world's grammar); the
        # method says how its concepts are composed (encoder methods take reference pictures).
        example = cfg.sample.prompts[0] if cfg.sample.prompts else "a photo of {name}"
        from conceptkit.artifact import read_meta
        from conceptkit.registry import method_class

        method = method_class(read_meta(output)["method"])
        print(f"render it: conceptkit compose {method.compose_example(str(output), cfg.name, example)}")
    elif command == "compose":
        cfg = compose("compose", overrides)
        from conceptkit.compose import compose as run_compose

        output = run_compose(cfg)
        print(f"renders written to {output}")
    elif command == "pretrain" and any(o.startswith("encoder=") for o in overrides):
        cfg = compose("pretrain_encoder", overrides)
        from conceptkit.training.pretrain_encoder import pretrain_encoder

        output = pretrain_encoder(cfg, overrides)
        print(f"image encoder written to {output}")
    elif command == "pretrain" and any(o.startswith("vlm=") for o in overrides):
        cfg = compose("pretrain_vlm", overrides)
        from conceptkit.training.pretrain_vlm import pretrain_vlm

        output = pretrain_vlm(cfg, overrides)
        print(f"vision-language model written to {output}")
    elif command == "pretrain":
        cfg = compose("pretrain", overrides)
        from conceptkit.training.pretrain import pretrain

        output = pretrain(cfg, overrides)
        print(f"toy backbone written to {output}")
    elif command == "bench":
        cfg = compose("bench", overrides)
        from conceptkit.bench import run_suite

        output = run_suite(cfg)
        print(f"results written to {output}")
    return 0


def _ls(args: list[str]) -> int:
    from pathlib import Path

    from conceptkit.config import group_options
    from conceptkit.registry import method_names

    print("methods:   " + ", ".join(method_names()))
    print("backbones: " + ", ".join(group_options("backbone")))
    if args:
        import json

        root = Path(args[0])
        if not root.is_dir():
            print(f"error: {root} is not a folder", file=sys.stderr)
            return 2
        print(f"concepts in {root}:")
        for meta_path in sorted(root.glob("*/concept.json")):
            try:
                meta = json.loads(meta_path.read_text())
                print(f"  {meta_path.parent.name}: {{{meta['name']}}} method={meta['method']} "
                      f"backbone={meta['backbone']['family']} ({meta['backbone']['id']})")
            except (json.JSONDecodeError, KeyError):
                print(f"  {meta_path.parent.name}: damaged concept.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    command, rest = args[0], args[1:]
    if command == "ls":
        return _ls(rest)
    if command not in ("train", "compose", "bench", "pretrain"):
        print(f"error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    if any(a in ("-h", "--help") for a in rest):
        print(USAGE)
        return 0
    debug = any(a.lower() in ("debug=true", "debug=1") for a in rest)
    from conceptkit.errors import UserError

    try:
        return _run(command, rest)
    except UserError as error:
        if debug:
            raise
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; a train run continues with the same command plus resume=true", file=sys.stderr)
        return 130
    except Exception as error:  # anything unexpected: one line unless debug=true
        if debug:
            raise
        print(f"error: {type(error).__name__}: {error} (rerun with debug=true for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
