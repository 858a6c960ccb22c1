"""The combined (prefill + decode) engine worker (`rtpllm serve worker`)."""
