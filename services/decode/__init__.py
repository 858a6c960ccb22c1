"""A decode instance of the disaggregated topology (`rtpllm serve decode`)."""
