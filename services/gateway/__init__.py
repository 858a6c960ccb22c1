"""The OpenAI-compatible HTTP gateway (`rtpllm serve gateway`)."""
