"""The MoE layer benchmark: every backend against the dense-equivalent FFN (design/PERF.md).

    python benchmarks/moe_layer.py                       # full grid, every available backend
    python benchmarks/moe_layer.py --shapes quick        # a few seconds
    python benchmarks/moe_layer.py --backend numba --json results.json

Same as `tinymoe bench` and `python -m tinymoe.bench`; all options and every column are explained in
`tinymoe/bench.py` and benchmarks/README.md.
"""
import sys

from tinymoe.bench import main

if __name__ == "__main__":
    sys.exit(main())
