"""pipeline/host_memory.py: freed host memory reused in place, without page faults."""

import platform
import subprocess
import sys

import pytest

from pipeline import host_memory
from pipeline.config import REPO_ROOT

# Page faults of 4 rounds of a step-like pattern (tensors of 3 to 64 MiB, written, live
# together, then freed) after 6 rounds of warm-up; with "keep", keep_freed_memory() first.
FAULTS_SCRIPT = """
import resource, sys, torch
from pipeline.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
def step():
    live = [torch.empty(n).fill_(1.0) for n in (2**24, 2**22, 3 * 2**20, 2**24 + 1024, 2**23)]
    del live
    torch.empty(2**24).fill_(1.0)
for _ in range(6):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    step()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""
GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def page_faults(mode: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FAULTS_SCRIPT, mode],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    )  # fmt: skip
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not GLIBC, reason="glibc's malloc only")
def test_freed_memory_is_reused_without_page_faults():
    kept, plain = page_faults("keep"), page_faults("plain")
    # 4 x 200 MiB mapped afresh: ~200,000 faults of 4 KiB pages (fewer with huge pages)
    assert kept < 256, f"{kept} page faults with freed memory kept ({plain} without)"


def test_does_nothing_off_linux(monkeypatch):
    monkeypatch.setattr(sys, "platform", "darwin")
    assert host_memory.keep_freed_memory() is False


@pytest.mark.parametrize("name", host_memory.GLIBC_MALLOC_ENV)
def test_leaves_glibc_settings_of_the_user_alone(monkeypatch, name):
    monkeypatch.setenv(name, "0")
    assert host_memory.keep_freed_memory() is False
