"""Image prompts in the disaggregated topology (compose's and `rtpllm up`'s default): the
decode instance hands an image prompt to a prefill instance with its images; the prefill
instance gets the embeddings (from the vision service's cache: the decode instance asked
for them first) and ships the KV back. The answer equals in-process encoding."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from rtpllm import LLM, SamplingParams
from rtpllm.runtime.stack import Stack
from tests.integration.support import dump_logs, start_stack
from tests.integration.test_vision_service import (
    MAX_TOKENS,
    VISION_ARGS,
    ask,
    image_paths,
    messages,
    metric,
    settled,
    wait_metric,
    warm_remote_path,
)
from tests.multimodal_support import write_qwen2_vl


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_qwen2_vl(tmp_path_factory.mktemp("vlm-pd") / "tiny-qwen2-vl").path


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[tuple[int, ...], tuple[str, int]]:
    llm = LLM(str(model_dir), device="cpu", max_model_len=512, num_blocks=256)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    out = {}
    for seeds in ((0, 2), (5,)):
        result = llm.chat([messages(list(seeds))], params)[0]
        out[seeds] = (result.outputs[0].text, len(result.prompt_token_ids))
    return out


@pytest.fixture(scope="module")
def stack(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    log_dir = tmp_path_factory.mktemp("vision-pd")
    s = start_stack(
        model_dir, log_dir, workers=0, prefill=1, decode=1, vision=1, vision_args=VISION_ARGS,
        worker_args=["--max-model-len", "512", "--num-blocks", "256"],
        decode_args=["--local-prefill-below", "0"],  # every prompt goes to the prefill instance
    )  # fmt: skip
    try:
        yield s
    except BaseException:
        dump_logs(log_dir)
        raise
    finally:
        s.stop()


def test_image_prompts_are_handed_off_and_match_in_process(stack: Stack, reference: dict[tuple[int, ...], tuple[str, int]]) -> None:
    wait_metric(stack, "rtpllm_vision_instances", 1)
    warm_remote_path(stack, seed=1, engines=2)  # counted from here
    prefills, encoded, hits, paths = settled(
        lambda: (
            metric(stack, "rtpllm_prefills", kind="remote"), metric(stack, "rtpllm_vision_images_encoded"),
            metric(stack, "rtpllm_vision_cache_hits", cache="memory"), image_paths(stack),
        )
    )  # fmt: skip
    assert ask(stack, [0, 2]) == reference[(0, 2)]
    assert ask(stack, [5], stream=True) == reference[(5,)]
    assert wait_metric(stack, "rtpllm_prefills", prefills + 2, kind="remote") == prefills + 2
    assert metric(stack, "rtpllm_prefills", kind="fallback") == 0
    # Each image went through the tower once (the decode instance's request); the prefill
    # instance's were cache hits.
    assert wait_metric(stack, "rtpllm_vision_images_encoded", encoded + 3) == encoded + 3
    assert wait_metric(stack, "rtpllm_vision_cache_hits", hits + 3, cache="memory") == hits + 3, (paths, image_paths(stack))
