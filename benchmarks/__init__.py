"""sit_fast benchmark suite: throughput, MFU, memory and parity against the eager reference.

    python -m benchmarks all --device cpu --size tiny --out /tmp/bench      # dry run (CI)
    PYTHONPATH=. python3 -m benchmarks all --device cuda --size full --out $OUT   # one H100, < 8 min

Suites (benchmarks/<suite>_suite.py): kernels, parity, train, sample, memory. Every figure is a
JSON record with the fields of `benchmarks.common.FIELDS`, written to results.json and results.md
after each record. See benchmarks/README.md.

This package must not import torch or triton at import time: `python -m benchmarks` sets
TRITON_INTERPRET before triton is first imported.
"""
