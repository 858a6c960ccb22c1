"""rtpllm's services: each folder holds an entry point and its wiring; the logic lives in
the `rtpllm` library."""
