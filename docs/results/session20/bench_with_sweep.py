"""The benchmark with the best dx and dw launch configurations of a products sweep.

Reads $OUT/sweep.log (`python -m benchmarks.linear_products --kernel triton --sweep`),
takes each dx or dw row whose best configuration beat the default by more than 2%, and
runs `python -m benchmarks.benchmark` with those configurations in place of
`products_triton.launch_config`'s. Arguments are the benchmark's.
"""

import ast
import os
import sys

from benchmarks.benchmark import main
from benchmarks.linear_products import layer_products
from models import products_triton

SHAPES = {name: (k, n) for name, k, n in layer_products(64)}  # the sweep's rows, d = 64


def sweep_winners(path: str) -> dict:
    """{(op, K, N): configuration} from the sweep's Markdown rows."""
    winners = {}
    if not os.path.exists(path):
        return winners
    for line in open(path):
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 5 and cells[0] in SHAPES and cells[1] in ("dx", "dw"):
            default, fastest = float(cells[2]), float(cells[3])
            if fastest < 0.98 * default:
                winners[(cells[1], *SHAPES[cells[0]])] = ast.literal_eval(cells[4])
    return winners


if __name__ == "__main__":
    winners = sweep_winners(os.path.join(os.environ["OUT"], "sweep.log"))
    shipped = products_triton.launch_config

    def launch_config(op: str, k: int, n: int) -> dict:
        return dict(winners.get((op, k, n)) or shipped(op, k, n))

    products_triton.launch_config = launch_config
    print("overrides:", winners, file=sys.stderr)
    sys.exit(main(sys.argv[1:]))
