"""How long torch's OpenMP threads spin before they sleep, set before torch loads.

libgomp's default spins an idle thread for ~3 ms (300,000 spins) after each parallel
region. On CPU, measured on the 2-core VM (docs/deployment.md, "CPU threads"):
- several engine processes sharing cores (compose's replicas, the services `rtpllm up`
  starts) spin against each other: four concurrent long prompts over 2 decode + 2
  prefill replicas took 24-38 s a round; with 1,000 spins, 12.7-13.4 s;
- one engine alone decoding 16 sequences of SmolLM2 is no slower: 47-49 tok/s against
  the default's 37-56 (`OMP_WAIT_POLICY=PASSIVE`, no spinning at all, gave the shared
  rounds 11.4-11.6 s but this one 27-29 tok/s).
libgomp itself drops to 1,000 spins once one process has more threads than cores; it
cannot see other processes' threads.

libgomp reads the setting once, when torch loads it: importing rtpllm before torch
applies it to this process, and to every process it starts either way.
"""

from __future__ import annotations

import os

SPIN_COUNT = "1000"


def default_spin_count(environ: os._Environ[str] | dict[str, str] = os.environ) -> None:
    """GOMP_SPINCOUNT=1000 unless the user chose a spin count or a wait policy."""
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT
