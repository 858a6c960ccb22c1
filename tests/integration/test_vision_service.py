"""Images through the whole stack: real nats-server and Redis, a vision service, an
engine and the gateway as separate processes, a tiny random-weight Qwen2-VL checkpoint,
and the `openai` client.

- Two images in one request come back with the same greedy text as in-process encoding
  (`LLM.chat`), streaming or not, with the image tokens in `usage.prompt_tokens`.
- The same images again do not run the encoder: the vision service's counters (through
  the gateway's /metrics) show cache hits and no new encodes.
- A vision service killed while it holds a request: the engine notices its heartbeats
  stop, encodes the images itself, and the request is answered within 5 s.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.runtime.processes import wait_until
from rtpllm.runtime.stack import Stack
from rtpllm.serving.vision_server import FAULT_STALL_ENV
from tests.integration.support import client_for, dump_logs, get, start_stack
from tests.multimodal_support import data_url, random_image, write_qwen2_vl

MAX_TOKENS = 6
# Fast heartbeats. A 3 s lease: on a loaded 2-core machine a heartbeat can come a second
# late, and an engine that thinks the vision instance dead encodes the images itself (the
# metrics these tests read then never move). The kill test's instance takes a 1.5 s lease.
VISION_ARGS = ["--heartbeat-interval", "0.3", "--lease", "3.0", "--cache-gib", "0.05"]
KILLED_LEASE_S = 1.5


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_vl(tmp_path_factory.mktemp("vlm") / "tiny-qwen2-vl").path


def messages(seeds: list[int], text: str = "Compare the pictures.") -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = [
        {"type": "image_url", "image_url": {"url": data_url(random_image(40 + 12 * s, 70 - 9 * s, seed=s))}} for s in seeds
    ]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[tuple[int, ...], tuple[str, int]]:
    """In-process encoding (`LLM.chat`): the text and prompt length of each image set."""
    llm = LLM(str(model_dir), device="cpu", max_model_len=512, num_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for seeds in ((1, 2), (3,), (4, 5)):
        result = llm.chat([messages(list(seeds))], params)[0]
        out[seeds] = (result.outputs[0].text, len(result.prompt_token_ids))
    return out


@pytest.fixture(scope="module")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("vision-stack")
    s = start_stack(
        model_dir, log_dir, workers=1, vision=1, vision_args=VISION_ARGS,
        worker_args=["--max-model-len", "512", "--num-blocks", "256"],
        role_env={"vision": {FAULT_STALL_ENV: "0"}},
    )  # fmt: skip
    try:
        yield s
    except BaseException:
        dump_logs(log_dir)
        raise
    finally:
        s.stop()


def metric(stack: Stack, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include `labels` (0 when absent)."""
    text = get(stack, "/metrics", timeout=5).text
    total = 0.0
    for line in text.splitlines():
        m = re.match(rf"^{name}(?:_total)?(?:\{{(.*)\}})? ([0-9.e+-]+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            total += float(m.group(2))
    return total


def ask(stack: Stack, seeds: list[int], stream: bool = False) -> tuple[str, int]:
    client = client_for(stack)
    kwargs: dict[str, Any] = dict(
        model=stack.config.served_model_name or Path(stack.config.model).name, messages=messages(seeds),
        max_tokens=MAX_TOKENS, temperature=0, extra_body={"ignore_eos": True},
    )  # fmt: skip
    if not stream:
        resp = client.chat.completions.create(**kwargs)
        return resp.choices[0].message.content or "", resp.usage.prompt_tokens
    text, prompt_tokens = "", 0
    for chunk in client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if chunk.usage is not None:
            prompt_tokens = chunk.usage.prompt_tokens
    return text, prompt_tokens


def wait_metric(stack: Stack, name: str, at_least: float, **labels: str) -> float:
    """Heartbeats carry the counters: wait until the gateway has seen `at_least` (30 s:
    on a loaded 2-core machine a heartbeat can come late)."""
    wait_until(lambda: metric(stack, name, **labels) >= at_least, 30, f"{name}{labels} >= {at_least}", [])
    return metric(stack, name, **labels)


def settled(read: Callable[[], Any], quiet_s: float = 2.5, timeout: float = 30) -> Any:
    """`read()` once it has not changed for `quiet_s` (over two engine heartbeats, 1 s
    apart): a baseline taken while a heartbeat is still on its way would be off by it."""
    value, since, start = read(), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        assert time.monotonic() - start < timeout, f"still changing after {timeout} s: {value}"
        time.sleep(0.2)
        now = read()
        if now != value:
            value, since = now, time.monotonic()
    return value


def image_paths(stack: Stack) -> dict[str, float]:
    """Images by how the engine got their embeddings (`local` includes the fallbacks')."""
    return {path: metric(stack, "rtpllm_images", path=path) for path in ("remote", "local", "fallback")}


def counted(stack: Stack) -> float:
    paths = image_paths(stack)
    return paths["remote"] + paths["local"]


def warm_remote_path(stack: Stack, seed: int = 0, engines: int = 1, tries: int = 3) -> None:
    """One image (`seed`) through the vision service before the counted requests, for
    each of the `engines` that resolve it (a disaggregated request: the decode and the
    prefill instance): a first request can meet a service still warming up on a loaded
    machine, and an engine that gives up on it encodes the images itself (correct, but
    it moves other counters). The engines log why (vision_client.ImageResolver)."""
    for _ in range(tries):
        before = image_paths(stack)
        ask(stack, [seed])  # a retry may find it in the service's cache: encoded by an earlier try
        wait_until(lambda b=before: counted(stack) >= b["remote"] + b["local"] + engines, 30, "the warm-up image counted", [])
        if image_paths(stack)["remote"] >= before["remote"] + engines:
            return
    raise AssertionError(f"no warm-up image went through the vision service in {tries} tries: {image_paths(stack)}")


def test_two_images_match_in_process_encoding_and_repeat_without_encoding(
    stack: Stack, reference: dict[tuple[int, ...], tuple[str, int]]
) -> None:
    wait_metric(stack, "rtpllm_vision_instances", 1)
    warm_remote_path(stack)
    paths, encoded = settled(lambda: (image_paths(stack), metric(stack, "rtpllm_vision_images_encoded")))
    text, prompt_tokens = ask(stack, [1, 2])
    assert (text, prompt_tokens) == reference[(1, 2)]  # usage counts the image tokens
    wait_until(lambda: counted(stack) >= paths["remote"] + paths["local"] + 2, 30, "both images counted", [])
    after = image_paths(stack)
    assert after["remote"] == paths["remote"] + 2, f"not through the vision service: {paths} -> {after}"
    assert wait_metric(stack, "rtpllm_vision_images_encoded", encoded + 2) == encoded + 2
    hits = metric(stack, "rtpllm_vision_cache_hits", cache="memory")

    # The same images again, streamed: same text, and the encoder does not run.
    assert ask(stack, [1, 2], stream=True) == reference[(1, 2)]
    assert wait_metric(stack, "rtpllm_vision_cache_hits", hits + 2, cache="memory") == hits + 2
    assert metric(stack, "rtpllm_vision_images_encoded") == encoded + 2
    assert image_paths(stack)["fallback"] == paths["fallback"]
    assert metric(stack, "rtpllm_vision_embedding_bytes") > 0


def test_killed_vision_service_mid_request_is_answered_by_local_encoding(
    stack: Stack, reference: dict[tuple[int, ...], tuple[str, int]]
) -> None:
    wait_metric(stack, "rtpllm_vision_instances", 1)
    fallbacks = metric(stack, "rtpllm_images", path="fallback")
    # A vision instance that stalls every request: killed while it holds one.
    old = stack.visions.pop()
    old.stop(5)
    stack.config.role_env["vision"] = {FAULT_STALL_ENV: "30"}
    stalled = stack.add_vision(["--lease", str(KILLED_LEASE_S)])
    wait_until(lambda: metric(stack, "rtpllm_vision_instances") == 1 and _vision_ids(stack) == 1, 10, "one vision instance", [])

    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(ask, stack, [4, 5])
        time.sleep(1.5)  # taken and stalled by now
        assert not answer.done()
        killed_at = time.monotonic()
        stalled.signal(9)
        assert answer.result(timeout=10) == reference[(4, 5)]
        assert time.monotonic() - killed_at <= 5.0
    assert wait_metric(stack, "rtpllm_images", fallbacks + 1, path="fallback") == fallbacks + 1
    # Without a vision service the engine encodes everything itself, and keeps serving.
    wait_until(lambda: metric(stack, "rtpllm_vision_instances") == 0, 10, "the dead vision instance to expire", [])
    assert ask(stack, [3]) == reference[(3,)]


def _vision_ids(stack: Stack) -> int:
    return int(metric(stack, "rtpllm_vision_instances"))


def test_supervisor_restarts_a_dead_vision_service(stack: Stack, reference: dict[tuple[int, ...], tuple[str, int]]) -> None:
    """`rtpllm up`'s supervisor replaces the vision service killed above; requests use it again."""
    from rtpllm.runtime.supervisor import Supervisor

    assert stack.visions and not any(p.alive for p in stack.visions)  # the one killed above
    stack.config.role_env["vision"] = {}
    said: list[str] = []
    supervisor = Supervisor(stack, said.append)
    deadline = time.monotonic() + 60
    while metric(stack, "rtpllm_vision_instances") < 1:
        assert time.monotonic() < deadline, said
        supervisor.tick()
        time.sleep(0.25)
    assert supervisor.restarts == 1 and any("restarting it" in line for line in said), said
    remote = metric(stack, "rtpllm_images", path="remote")
    assert ask(stack, [1, 2]) == reference[(1, 2)]
    assert wait_metric(stack, "rtpllm_images", remote + 2, path="remote") == remote + 2
