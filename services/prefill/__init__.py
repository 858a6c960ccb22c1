"""A prefill instance of the disaggregated topology (`rtpllm serve prefill`)."""
