"""Structured outputs: constraining a request's output to a JSON schema, a regex, a list
of choices or a grammar (docs/structured_outputs.md).

`spec.py` holds the request-level parameters (no grammar engine imported), `grammar.py`
compiles them with llguidance, `matcher.py` is one sequence's grammar state and
`bitmask.py` applies a batch's token masks to logits on the device.
"""

from rtpllm.structured.spec import StructuredOutputsParams

__all__ = ["StructuredOutputsParams"]
