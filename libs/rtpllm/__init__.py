"""rtpllm: high-performance LLM inference and serving.

    from rtpllm import LLM, SamplingParams
    llm = LLM()  # the embedded SmolLM2-135M-Instruct
    print(llm.chat([{"role": "user", "content": "Hi!"}])[0].outputs[0].text)
"""

from rtpllm.openmp import default_spin_count
from rtpllm.outputs import CompletionOutput, Logprob, RequestOutput
from rtpllm.sampling_params import SamplingParams
from rtpllm.structured.spec import StructuredOutputsParams

default_spin_count()  # before anything loads torch (none of the above does; rtpllm.openmp says why)

__version__ = "0.1.0"

__all__ = ["LLM", "AsyncLLMEngine", "CompletionOutput", "Logprob", "RequestOutput", "SamplingParams", "StructuredOutputsParams", "__version__"]


def __getattr__(name: str):  # lazy: importing rtpllm must not load torch-heavy modules
    if name == "LLM":
        from rtpllm.llm import LLM

        return LLM
    if name == "AsyncLLMEngine":
        from rtpllm.engine.async_engine import AsyncLLMEngine

        return AsyncLLMEngine
    raise AttributeError(name)
