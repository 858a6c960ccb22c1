"""The OpenAI-compatible API: request schemas and validation, prompts, responses,
logprobs formats, SSE streaming, and the endpoint logic (`OpenAIServer`)."""
