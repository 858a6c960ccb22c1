"""Images in prompts: decoding and fetching them safely, our own HF-exact preprocessing,
and the vision towers that turn pixels into language-model embeddings.

Modules, bottom to top:

- `image_input`: bytes and `data:` URLs -> a validated RGB image with a content hash.
- `fetch`: http(s) and `file:` URLs -> bytes, with SSRF protection and caps.
- `qwen2_vl_processor`, `idefics3_processor`: image -> `pixel_values` (equal to the HF
  image processors') and the prompt-side placeholder expansion.
- `qwen2_vl_vision`, `idefics3_vision`: vision encoder + projector with HF parity, loaded
  from HF checkpoints through `weights`; `activations` holds the activations they name.
- `inputs`: what a request carries for its images (hashes, placeholder runs, grids, and
  pixels or precomputed embeddings); `mrope`: Qwen2-VL's 3-D positions of a prompt.
- `families`: per family, the image token, its expansion, the tower and the positions;
  `prompt`: template image tokens -> placeholder tokens + `MultimodalInputs`.

Nothing is imported eagerly: a gateway validating images does not pay for torch.
"""
