"""OpenMP's wait policy for processes that run torch.compile'd CPU kernels.

Inductor's CPU kernels run on OpenMP threads that, by default, spin for a while after each
parallel region. Once a process has run compiled kernels, those threads keep spinning between
the eager ops that follow and take the cores from them: on 2 cores, HF's eager generate ran
3-4.6x slower after one compiled generation, and 1.0-1.2x with passive waiting
(`bench/cpu_compile.py`; docs/evaluation.md, Generating text). The policy is read once, when
OpenMP starts (at `import torch`), so it must be in the environment before that: call
`passive_openmp_wait()` before importing torch. A policy the user set is kept.
"""

from __future__ import annotations

import os


def passive_openmp_wait() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the environment sets a policy; no effect once torch is imported."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
