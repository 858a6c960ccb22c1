"""Running rtpllm's processes: supervision helpers and whole stacks (used by `rtpllm up`
and the integration tests)."""
