"""Training throughput: kdistill's pipeline vs the model-only ceiling vs a tutorial-style loop.

    python benchmarks/throughput.py --data cifar10 --pair seed_teacher:seed_student \
        --pair resnet56:resnet20 --out benchmarks/results/throughput.md

The same as ``kdistill bench`` (see :mod:`kdistill.bench` for what is measured); prints
a markdown table with the exact command, torch version, thread count and machine, and
writes it to ``--out``. ``--quick`` checks that everything runs (5 steps, 1 repeat).
"""

from __future__ import annotations

import sys

from kdistill.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
