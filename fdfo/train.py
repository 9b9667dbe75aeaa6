"""Train a flow-matching text-to-image model with FDFO.

    python fdfo/train.py                                  # the built-in CPU default job (digits)
    python fdfo/train.py --config configs/sd35_medium.yaml --train.learning_rate 1e-5
    deepspeed fdfo/train.py --config configs/sd35_medium.yaml
    python fdfo/train.py --config builtin:digits --resume auto  # a built-in task's default job, by name

Any config key can be overridden as --section.key value.
"""

from __future__ import annotations

import os
import sys

if __package__ in (None, ""):
    # Run as a script (python/deepspeed fdfo/train.py): import the package, not this folder's modules.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path = [p for p in sys.path if os.path.abspath(p or ".") != here]
    sys.path.insert(0, os.path.dirname(here))


DEFAULT_JOB = "builtin:digits"


def parse_args(argv: list[str]):
    import argparse

    class Parser(argparse.ArgumentParser):
        def format_help(self) -> str:  # every setting, read from the config dataclasses when --help asks
            from fdfo.reference import help_text

            return f"{super().format_help()}\n{help_text()}\n"

    parser = Parser(prog="fdfo/train.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=DEFAULT_JOB,
                        help=f"YAML run config, or a built-in task's default job (default: {DEFAULT_JOB})")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", nargs="?", const="auto",
                       help="continue a run: a checkpoint or run directory, or 'auto' (the default when given "
                            "bare) for log.out_dir's latest checkpoint; a new run when it has none yet")
    start.add_argument("--overwrite", action="store_true",
                       help="start over in a log.out_dir that holds a run: the old run is moved aside to "
                            "<out_dir>.replaced-<time>")
    parser.add_argument("--algorithm", help="shorthand for --train.algorithm (flow_grpo: the Flow-GRPO baseline)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    from fdfo import tasks
    from fdfo.config import load_yaml, parse_overrides
    from fdfo.errors import ConfigError
    from fdfo.settings import build_config

    args, rest = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        builtin = tasks.is_builtin(args.config)
        preset = tasks.preset(args.config) if builtin else None  # a task's default job: defaults of its own
        cli = parse_overrides(rest)
        if args.algorithm:
            cli.setdefault("train", {})["algorithm"] = args.algorithm
        cfg = build_config(None if builtin else load_yaml(args.config), cli, under=preset)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"fdfo: config error: {exc}", file=sys.stderr)
        return 2
    if args.print_config:
        from fdfo.reference import commented_yaml

        print(commented_yaml(cfg), end="")
        return 0
    if args.config == DEFAULT_JOB:
        print(f"[fdfo] running the built-in default job ({DEFAULT_JOB}; --config FILE.yaml for your own)",
              flush=True)
    from fdfo import interrupts
    from fdfo.checkpoint import CheckpointError
    from fdfo.errors import TrainingError
    from fdfo.failures import last_checkpoint
    from fdfo.run_dir import RunComplete
    from fdfo.trainer import Trainer

    interrupts.install()
    try:
        trainer = Trainer(cfg, resume=args.resume, overwrite=args.overwrite)
        trainer.run()
    except RunComplete as exc:
        print(f"[fdfo] {exc}", flush=True)
        return 0
    except KeyboardInterrupt as exc:
        print(f"fdfo: stopped by {str(exc) or 'SIGINT'}; {last_checkpoint(cfg.log.out_dir)}", file=sys.stderr)
        return interrupts.exit_code(exc)
    except (FileNotFoundError, ConfigError, FloatingPointError, CheckpointError, TrainingError) as exc:
        print(f"fdfo: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
