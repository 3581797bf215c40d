"""Main job: `deepspeed training/train.py --config configs/<name>.yaml [key=value ...]`.

The training loop (DeepSpeed ZeRO, checkpoints with exact resume, metrics) is not built yet; until it
is, this entry point states what it will do and exits without training.
"""

import sys

PLAN = """\
training/train.py will train a Flamingo-style model with DeepSpeed:
  - with no arguments: a tiny Flamingo on the embedded generated dataset, a few minutes on a 2-core CPU,
    followed by a few-shot generation on held-out generated images next to their true captions;
  - with --config configs/<name>.yaml [key=value ...]: the named configuration.
The training loop is not available in this version yet: nothing was trained."""


def main(argv: list[str]) -> int:
    print(PLAN)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
