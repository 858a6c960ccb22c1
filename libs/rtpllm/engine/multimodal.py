"""The multimodal part of a model-runner step: image embeddings and M-RoPE positions.

The model runner calls this only while requests with images are live, so text-only
steps pay nothing. For the step's requests with images it

- encodes the images the step's tokens reach and that are not encoded yet, all in one
  batched tower call (images that come with precomputed embeddings skip the tower);
  a request keeps its embeddings until its prefill has passed its last image, so a
  prefill split into chunks encodes each image once, and images wholly inside a
  prefix-cache hit are never encoded;
- says which packed rows of the step take which embedding rows (a chunk may start or
  end inside an image's placeholder run);
- replaces the positions of M-RoPE requests: their prompt tokens' (t, h, w) positions
  (the step's positions become [3, T]) and every later token's position + delta.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from rtpllm.engine.request import Request
from rtpllm.engine.scheduler import ScheduledRequest, SchedulerOutput

if TYPE_CHECKING:
    # Only vision-language engines load the families (PIL, processors, towers).
    from rtpllm.multimodal.families import VisionFamily

# (packed row indices [K], embedding rows [K, hidden]) for DecoderLM.forward(embeds=...).
Splice = tuple[np.ndarray, torch.Tensor]


class MultimodalRunner:
    """Encodes the images of live requests and places their embeddings in each step."""

    def __init__(self, family: VisionFamily, tower: nn.Module, device: str, dtype: torch.dtype) -> None:
        self.family = family
        self.tower = tower
        self.device = device
        self.dtype = dtype
        self._live: set[str] = set()
        # Request id -> embeddings of each of its images (None: not encoded yet).
        self._encoded: dict[str, list[torch.Tensor | None]] = {}
        self.images_encoded = 0  # images that went through the tower (tests, metrics)

    @property
    def active(self) -> bool:
        """True while some live request has images."""
        return bool(self._live)

    def add(self, request: Request) -> None:
        if request.mm is not None:
            self._live.add(request.request_id)

    def drop(self, request_id: str) -> None:
        """The request is gone: forget it and its embeddings."""
        self._live.discard(request_id)
        self._encoded.pop(request_id, None)

    def apply(self, step: SchedulerOutput, positions: np.ndarray) -> tuple[np.ndarray, Splice | None]:
        """The step's positions ([T], or [3, T] when an M-RoPE prompt is in it) and the
        embeddings to splice in, given the text-rule positions (modified in place)."""
        items: list[tuple[ScheduledRequest, int]] = []
        base = 0
        for item in step.scheduled:
            if item.request.mm is not None:
                items.append((item, base))
            base += item.num_new_tokens
        if not items:
            return positions, None
        return self._positions(items, positions), self._splice(items)

    def _positions(self, items: list[tuple[ScheduledRequest, int]], positions: np.ndarray) -> np.ndarray:
        prompt_items = []
        for item, base in items:
            req = item.request
            if req.mrope_positions is None:
                continue
            start, end, prompt = item.start, item.start + item.num_new_tokens, req.num_prompt_tokens
            if end > prompt:  # outputs (decode, or recomputed after a preemption)
                positions[base + max(prompt - start, 0) : base + end - start] += req.mrope_delta
            if start < prompt:
                prompt_items.append((item, base))
        if not prompt_items:
            return positions
        # Text rows have t = h = w: the 1-D positions, on all three axes.
        out = np.repeat(positions[None, :], 3, axis=0)
        for item, base in prompt_items:
            req = item.request
            assert req.mrope_positions is not None
            start = item.start
            stop = min(start + item.num_new_tokens, req.num_prompt_tokens)
            out[:, base : base + stop - start] = req.mrope_positions[:, start:stop]
        return out

    def _splice(self, items: list[tuple[ScheduledRequest, int]]) -> Splice | None:
        self._encode_missing(items)
        index: list[np.ndarray] = []
        rows: list[torch.Tensor] = []
        for item, base in items:
            req = item.request
            assert req.mm is not None
            start, end = item.start, item.start + item.num_new_tokens
            if start >= req.mm.end:
                continue
            encoded = self._encoded[req.request_id]
            for image, embeds in zip(req.mm.images, encoded, strict=True):
                if image.offset >= end or image.end <= start:
                    continue
                assert embeds is not None
                row = 0  # the image's first embedding row in this run
                for offset, length in image.runs:
                    lo, hi = max(offset, start), min(offset + length, end)
                    if lo < hi:
                        index.append(np.arange(base + lo - start, base + hi - start, dtype=np.int64))
                        rows.append(embeds[row + lo - offset : row + hi - offset])
                    row += length
            if end >= req.mm.end:
                # Prefill is past the last image: free the embeddings (a preempted
                # request that recomputes encodes again).
                self._encoded.pop(req.request_id, None)
        if not index:
            return None
        return np.concatenate(index), torch.cat(rows)

    def _encode_missing(self, items: list[tuple[ScheduledRequest, int]]) -> None:
        """Encode, in one tower call, every image the step reaches that has no embeddings."""
        todo: list[tuple[list[torch.Tensor | None], int, Request]] = []
        for item, _ in items:
            req = item.request
            assert req.mm is not None
            start, end = item.start, item.start + item.num_new_tokens
            if start >= req.mm.end:
                continue
            encoded = self._encoded.setdefault(req.request_id, [None] * len(req.mm.images))
            for j, image in enumerate(req.mm.images):
                if encoded[j] is not None or image.offset >= end or image.end <= start:
                    continue
                if image.embeddings is not None:
                    encoded[j] = image.embeddings.to(self.device, self.dtype)
                else:
                    todo.append((encoded, j, req))
        if not todo:
            return
        images = [req.mm.images[j] for _, j, req in todo if req.mm is not None]
        embeddings = self.family.encode(self.tower, images)
        self.images_encoded += len(images)
        for (encoded, j, _), embeds in zip(todo, embeddings, strict=True):
            encoded[j] = embeds.to(self.dtype)
