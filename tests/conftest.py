"""Every test trains in fp32 unless it asks for bf16.

MIXED_PRECISION=bf16 (the default) resolves to bf16 on CPUs with AVX512-BF16 or AMX
(`config.resolve_precision`), so without this pin the exact comparisons (resume bit-equality, DDP
against one process, eval loss against a hand-computed mean) would depend on the CPU a CI machine
draws. Two pins: in this process every test sees a CPU without native bf16 (so bf16 falls back to
fp32, even in a test that clears the settings from the environment), and the scripts tests start
in subprocesses inherit MIXED_PRECISION=no. A test of the bf16 path asks for the `native_bf16`
fixture (skipped on CPUs without it) and passes the precision by flag or keyword, which beat the
environment.
"""

import os

import pytest

import config

os.environ["MIXED_PRECISION"] = "no"
HAS_NATIVE_BF16 = config.cpu_has_native_bf16()
UNPINNED = ("native_bf16", "real_cpu_bf16_check")


@pytest.fixture(autouse=True)
def _fp32_unless_asked(request, monkeypatch):
    if not any(name in request.fixturenames for name in UNPINNED):
        monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)


@pytest.fixture
def real_cpu_bf16_check():
    """`config.cpu_has_native_bf16` as it is, not pinned to False."""
    return config.cpu_has_native_bf16


@pytest.fixture
def native_bf16():
    """This CPU's real bf16 check; skips the test where the CPU has no native bf16."""
    if not HAS_NATIVE_BF16:
        pytest.skip("bf16 on a CPU needs AVX512-BF16 or AMX")
