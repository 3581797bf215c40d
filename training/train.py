"""Main job: train a Flamingo-style model with DeepSpeed.

    deepspeed training/train.py                                   # the embedded default (configs/default.yaml)
    deepspeed training/train.py --config configs/openflamingo-3b.yaml data.pairs.sources=... optim.lr=2e-4
    deepspeed --num_gpus 2 training/train.py run.deepspeed=configs/deepspeed/zero3.json
    python training/train.py [same arguments]                    # one process, no launcher

Arguments: ``--config PATH`` (YAML/JSON; default: the embedded default, ``configs/default.yaml``) and ``key=value``
overrides (values are YAML). The launcher's ``--local_rank`` is accepted; the rank is read from the environment.

Exit status: 0 done (or stopped at ``checkpoint.stop_at_step``), 2 bad configuration, 3 too many non-finite
losses, 143 / 130 stopped by SIGTERM / SIGINT after writing a checkpoint (run the same command again to resume).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.config import ConfigError, load_config  # noqa: E402


def parse_args(argv: list[str]) -> tuple[Optional[str], list[str]]:
    """(config path or None, overrides). No flags besides --config and the launcher's --local_rank."""
    config, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in ("-h", "--help"):
            print(__doc__)
            raise SystemExit(0)
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                if i + 1 >= len(argv):
                    raise ConfigError("--config needs a path")
                i += 1
                config = argv[i]
            else:
                config = arg.split("=", 1)[1]
        elif arg == "--local_rank" or arg == "--local-rank":
            i += 1  # the value is in the environment (LOCAL_RANK) too
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            pass
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(f"unexpected argument {arg!r}: expected --config PATH or key=value overrides")
        i += 1
    return config, overrides


def main(argv: Optional[list[str]] = None) -> int:
    try:
        config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
        config = load_config(config_path, overrides)
        from training.trainer import NonFiniteLossError, Trainer

        trainer = Trainer(config)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted before training started; nothing to save", file=sys.stderr)
        return 130
    from training.preemption import TrainingInterrupted

    try:
        result = trainer.fit()
        if trainer.ctx.is_main:
            print(trainer.summary(result), flush=True)
        if not result.stopped_early and config.eval.final_few_shot:
            trainer.few_shot_demo()
        if not result.stopped_early and config.eval.final_binding:
            trainer.binding_demo()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except TrainingInterrupted as e:  # SIGTERM/SIGINT or a launcher gone: a checkpoint of e.step was written
        if trainer.ctx.is_main:
            print(f"{e.reason}: checkpoint of step {e.step} at {e.checkpoint}; run again to resume", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C, or one outside the training loop
        print("interrupted; the last complete checkpoint is intact", file=sys.stderr)
        return 130
    finally:
        trainer.close()
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
