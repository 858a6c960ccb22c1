"""The `rtpllm` command: `up` (the whole stack), `serve gateway|worker|prefill|decode|kvstore|vision` (one service),
`serve MODEL` (vLLM's form: the whole stack with one worker), `secrets` (a compose stack's credentials),
`convert-gguf`. Flags read `RTPLLM_*` environment variables (see `--help`)."""

from __future__ import annotations

import argparse
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from rtpllm.cli import options
from rtpllm.cli.flags import add_flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rtpllm", description="rtpllm: LLM serving over NATS with an OpenAI-compatible API.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run the whole stack in the foreground: NATS, Redis, kvstore, prefill, decode and the gateway",
        description="Start nats-server, redis-server, the host's kvstore, the engines (by default 1 prefill and 1 decode "
        "instance; --workers N for N combined workers instead) and the gateway as child processes, the same topology "
        "as docker-compose.yml; wait until they are ready, print the URL, and stop them all on Ctrl-C / SIGTERM.",
    )
    add_flags(up, "stack", options.UP)
    add_flags(up, "model", options.MODEL)
    add_flags(up, "engine (passed to every engine instance)", options.UP_ENGINE)
    add_flags(up, "disaggregation (passed to decode instances)", options.DISAGG)
    add_flags(up, "images (passed to the gateway; vision-language models)", options.IMAGES)

    serve = commands.add_parser(
        "serve",
        help="run one service (scale each independently); or `serve MODEL`, vLLM's form: the whole stack with one worker",
        description="Run one service. `rtpllm serve MODEL [FLAGS]` (MODEL not a service name) is vLLM's `vllm serve "
        "MODEL`: `rtpllm up --model MODEL --workers 1 [FLAGS]`, one command for an OpenAI-compatible server on port 8000.",
    )
    services = serve.add_subparsers(dest="service", required=True, metavar="SERVICE")
    gateway = services.add_parser(
        "gateway",
        help="the OpenAI-compatible HTTP gateway",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models, /v1/models/{id}, /tokenize, /detokenize, "
        "/version, /health, /ready, /metrics and /instances, routing requests to workers over NATS.",
    )
    add_flags(gateway, "bus", options.BUS)
    add_flags(gateway, "model", options.MODEL)
    add_flags(gateway, "gateway", options.GATEWAY)
    worker = services.add_parser(
        "worker",
        help="a combined (prefill + decode) engine worker",
        description="Load the model into one engine and serve requests that gateways send over NATS.",
    )
    add_flags(worker, "bus", options.BUS)
    add_flags(worker, "model", options.MODEL)
    add_flags(worker, "engine", options.ENGINE)
    add_flags(worker, "worker", options.WORKER)
    for role, text in (
        ("prefill", "a prefill instance: prefills prompts handed off by decode instances and ships their KV"),
        ("decode", "a decode instance: takes requests from gateways, gets long prompts prefilled by prefill instances"),
    ):
        sub = services.add_parser(role, help=text, description=f"{text[0].upper()}{text[1:]} (see docs/disaggregation.md).")
        add_flags(sub, "bus", options.BUS)
        add_flags(sub, "model", options.MODEL)
        add_flags(sub, "engine", options.ENGINE)
        add_flags(sub, "worker", options.WORKER)
        add_flags(sub, "disaggregation", options.DISAGG)

    kvstore = services.add_parser(
        "kvstore",
        help="the KV store of this host: host-memory, SSD and Redis tiers shared by its engines",
        description="Serve this host's KV tiers to the engines started with --kvstore on it: block lookups, "
        "gets and puts over NATS, the KV bytes over the data plane (see docs/kvstore.md).",
    )
    add_flags(kvstore, "bus", options.BUS)
    add_flags(kvstore, "kvstore", options.KVSTORE)
    vision = services.add_parser(
        "vision",
        help="a vision encoder of a vision-language model, shared by its engines",
        description="Encode the images of engines' requests (batched across requests), keep the embeddings by "
        "content hash in memory (and with --kvstore in the host's kvstore tiers), and ship them to the engines over "
        "the data plane (see docs/multimodal.md).",
    )
    add_flags(vision, "bus", options.BUS)
    add_flags(vision, "model", options.MODEL)
    add_flags(vision, "vision", options.VISION)

    prepare = commands.add_parser(
        "prepare",
        help="resolve a model (converting an embedded one on first use) and print its directory",
        description="Resolve MODEL to an HF-format directory, converting a known embedded model (its GGUF) into "
        "$RTPLLM_CACHE_DIR/models once; compose runs it before the services that need the model.",
    )
    add_flags(prepare, "model", options.MODEL[:1])
    secrets = commands.add_parser(
        "secrets",
        help="make a stack's secrets (NATS token, Redis password, API key) into a directory, once",
        description="Write a random NATS token (and the nats-server config that demands it), Redis password "
        "and API key into DIR, each readable by its owner only; those already there are kept. Compose runs it "
        "once into a volume that nats, redis and the rtpllm services read.",
    )
    secrets.add_argument("directory", metavar="DIR")
    add_flags(secrets, "secrets", options.SECRETS)
    health = commands.add_parser(
        "health",
        help="exit 0 while a service's --health-file is fresh (container healthchecks)",
        description="Succeed if FILE was touched within --max-age seconds: engines and the kvstore touch their "
        "--health-file every heartbeat while they serve.",
    )
    health.add_argument("file", metavar="FILE")
    health.add_argument("--max-age", type=float, default=10.0, help="seconds (default: 10)")
    convert = commands.add_parser(
        "convert-gguf",
        help="convert a llama-architecture GGUF file to an HF-format model directory",
        add_help=False,  # its own parser (rtpllm.loader.gguf_convert) handles --help
    )
    convert.add_argument("convert_args", nargs=argparse.REMAINDER)
    return parser


SERVICES = ("gateway", "worker", "prefill", "decode", "kvstore", "vision")
# What `serve MODEL` starts unless the flags choose a topology: one engine that prefills
# and decodes, as `vllm serve` runs (the default prefill + decode pair would load the
# weights twice, on one GPU too).
_SERVE_MODEL_TOPOLOGY = ("--workers", "--prefill", "--decode")


def serve_model_argv(argv: list[str]) -> list[str]:
    """`serve MODEL [FLAGS]` (vLLM's form) as `up --model MODEL --workers 1 [FLAGS]`;
    any other argv as it is. SystemExit for a word after `serve` that looks like a
    mistyped service name and is no path."""
    if len(argv) < 2 or argv[0] != "serve" or argv[1] in SERVICES or argv[1].startswith("-"):
        return argv
    model, flags = argv[1], argv[2:]
    close = difflib.get_close_matches(model, SERVICES, n=1, cutoff=0.75)
    if close and not Path(model).expanduser().exists():
        raise SystemExit(
            f"rtpllm serve: unknown service {model!r} (did you mean {close[0]!r}?); services: {', '.join(SERVICES)}, "
            "or a model (a known name or a directory) to serve the whole stack"
        )
    if any(f == "--model" or f.startswith("--model=") for f in flags):
        raise SystemExit(f"rtpllm serve {model}: the model is given twice (as MODEL and --model)")
    topology = [] if any(f.split("=", 1)[0] in _SERVE_MODEL_TOPOLOGY for f in flags) else ["--workers", "1"]
    return ["up", "--model", model, *topology, *flags]


def main(argv: Sequence[str] | None = None) -> int:
    argv = serve_model_argv(list(sys.argv[1:] if argv is None else argv))
    if argv[:1] == ["convert-gguf"]:
        # Handed over whole: argparse's REMAINDER would swallow neither --help nor flags.
        from rtpllm.loader.gguf_convert import main as convert_main

        return convert_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "health":
        from rtpllm.serving.health import main as health_main

        return health_main(args.file, args.max_age)
    if args.command == "secrets":
        from rtpllm.cli.secrets import main as secrets_main

        return secrets_main(args.directory, args.api_key)
    if args.command == "prepare":
        from rtpllm.models.registry import resolve_model

        try:
            print(resolve_model(args.model))
        except (ValueError, ModuleNotFoundError, FileNotFoundError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "up":
        from rtpllm.cli.up import run_up

        return run_up(args)
    if args.command == "serve":
        from rtpllm.cli import serve

        if args.service == "gateway":
            return serve.run_gateway(args)
        if args.service == "kvstore":
            return serve.run_kvstore(args)
        if args.service == "vision":
            return serve.run_vision(args)
        return serve.run_worker(args)
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
