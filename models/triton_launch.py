"""Compile options that every Triton kernel of this project is launched with.

FP fusion (contracting a multiply and an add into one FMA): Triton 3.9 warns that its
default turns off in Triton 3.10. These kernels were tuned, timed and tested with it on.
Without it, sm_90 code gets 6-8% more instructions in the causal convolution and 1.3%
more in the SSD forward, because FFMA splits into FMUL + FADD
(docs/results/session22/fp_fusion_ptx.md). Pinning it keeps the measured code across
Triton upgrades, and Triton 3.9 no longer warns about these kernels. mamba-ssm's kernels
keep Triton's default.
"""

from __future__ import annotations

COMPILE_OPTIONS = {"enable_fp_fusion": True}
