"""One CPU engine alone under different OpenMP spin settings: SmolLM2-135M-Instruct
offline (`LLM.generate`), 256-token prompts, 64 greedy tokens each, batch 1 and 16, each
setting in a fresh process (libgomp reads its settings once, when torch loads).

    python bench/openmp_spin.py [--repeats 2] [--out spin.json]

Several engines sharing cores are `bench/compose_up.py --engine-env ...`'s part.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "libgomp default (300,000 spins)": {},
    "GOMP_SPINCOUNT=10000": {"GOMP_SPINCOUNT": "10000"},
    "GOMP_SPINCOUNT=1000 (rtpllm's default)": {"GOMP_SPINCOUNT": "1000"},
    "OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
}
# `rtpllm` sets GOMP_SPINCOUNT itself when neither variable is set: the default row sets
# the spin count libgomp would pick, 300,000.
DEFAULT_SPINS = {"GOMP_SPINCOUNT": "300000"}

CHILD = """
import json, sys, time
from rtpllm import LLM, SamplingParams
from rtpllm.models.registry import resolve_model
llm = LLM(str(resolve_model("smollm2-135m-instruct")), device="cpu", max_model_len=1024)
params = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True)
prompts = [list(range(100 + i, 356 + i)) for i in range(16)]
llm.generate([prompts[0]], SamplingParams(max_tokens=4))  # warm-up
out = {}
for n in (1, 16):
    start = time.perf_counter()
    llm.generate(prompts[:n], params)
    out[n] = round(n * 64 / (time.perf_counter() - start), 1)
print(json.dumps(out))
"""


def run(env_extra: dict[str, str]) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    env.update(env_extra or DEFAULT_SPINS)
    env["PYTHONPATH"] = f"{ROOT / 'libs'}:{env.get('PYTHONPATH', '')}"
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    result: dict[str, object] = {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "cores": os.cpu_count()}
    rows: dict[str, list[dict[str, float]]] = {name: [] for name in SETTINGS}
    for _ in range(args.repeats):  # interleaved: drift on a shared machine hits every setting
        for name, env in SETTINGS.items():
            rows[name].append(run(env))
    result["tok_s"] = rows
    print(f"{'setting':42s} {'batch 1 tok/s':>16s} {'batch 16 tok/s':>16s}")
    for name, runs in rows.items():
        b1 = "-".join(f"{r['1']:.1f}" for r in runs)
        b16 = "-".join(f"{r['16']:.1f}" for r in runs)
        print(f"{name:42s} {b1:>16s} {b16:>16s}")
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
