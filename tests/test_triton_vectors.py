"""models/triton_vectors.row_sums, the second pass of the fused kernels' partial sums,
against float64: rows shorter than one block, several blocks with a ragged end, leading
axes; and its refusals.

On CUDA (marked gpu) and, where Triton is installed, on CPU through its interpreter.
"""

from __future__ import annotations

import pytest
import torch
from conftest import relative_error, run_in_triton_interpreter

SHAPES = [(3, 64, 7), (256, 2813), (2, 5, 1024), (4, 3, 1), (0, 9)]


def check_row_sums(device: str) -> float:
    """The largest relative error of row_sums over SHAPES, against float64 per row."""
    from models.triton_vectors import row_sums

    worst = 0.0
    for i, shape in enumerate(SHAPES):
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        got = row_sums(x.to(device=device, dtype=torch.float32))
        assert got.shape == shape[:-1] and got.dtype == torch.float32
        if got.numel():
            worst = max(worst, relative_error(got, x.sum(-1)))
    return worst


def test_row_sums_in_interpreter():
    run_in_triton_interpreter(
        "from tests.test_triton_vectors import check_row_sums\n"
        "assert check_row_sums('cpu') < 1e-6\n"
        "print('ok')\n"
    )


def test_row_sums_refuse_other_layouts():
    pytest.importorskip("triton")
    from models.triton_vectors import row_sums

    with pytest.raises(ValueError, match="contiguous float32"):
        row_sums(torch.randn(4, 6).t())
    with pytest.raises(ValueError, match="contiguous float32"):
        row_sums(torch.randn(4, 6, dtype=torch.float64))


@pytest.mark.gpu
def test_row_sums_on_gpu():
    assert check_row_sums("cuda") < 1e-6
