"""The prefill side of disaggregation: serve a hand-off from a decode instance.

For a GenerateRequest with `handoff` set: prefill the prompt (chunked), shipping each
chunk's finished KV blocks to the decode instance while the next chunk computes; then
send the first token to the decode instance (PrefillResult) and, right after, to the
gateway (TokenDelta seq 0: the client's first token does not wait for the transfer);
then ship the last blocks, wait for the receiver's acknowledgement, and free the KV.

Failures never reach the client from here: the decode instance owns the request, so it
hears of them (PrefillResult with an error, a broken transfer, or this instance's lease
running out) and retries elsewhere or prefills locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from nats.aio.client import Client as NATS

from rtpllm.protocol import subjects
from rtpllm.protocol.convert import delta_from_output
from rtpllm.protocol.messages import (
    DisaggCounters,
    ErrorCode,
    ErrorInfo,
    GenerateRequest,
    PrefillResult,
    TokenDelta,
    TransferCounters,
    Usage,
    encode,
)
from rtpllm.sampling_params import SamplingParams
from rtpllm.transfer import KVEndpoint, KVSender, TransferError

log = logging.getLogger(__name__)

HANDOFF = "handoff"  # finish_reason of a prefill-only request that handed its KV over

# Fault injection for the failure tests only: seconds to stall after the first token
# went out and before the last KV blocks are sent.
FAULT_STALL_ENV = "RTPLLM_FAULT_TRANSFER_STALL_S"


class PrefillSide:
    """Hand-off serving of one prefill instance (used by its EngineServer)."""

    def __init__(self, nc: NATS, engine: Any, instance_id: str, sender: KVSender, block_size: int) -> None:
        self._nc = nc
        self._engine = engine
        self._instance_id = instance_id
        self._sender = sender
        self._block_size = block_size
        self._stall_s = float(os.environ.get(FAULT_STALL_ENV, "0") or 0)
        self._counters = DisaggCounters()

    def counters(self) -> DisaggCounters:
        return self._counters

    async def serve(
        self,
        req: GenerateRequest,
        params: SamplingParams,
        publish: Callable[[str, TokenDelta], Awaitable[None]],
        images: Callable[[], Awaitable[Any]] | None = None,
    ) -> None:
        """Run one hand-off to its end. Raises only CancelledError (the decode instance
        or the gateway cancelled it); everything else is reported to the decode side.
        `images`: gets the prompt's MultimodalInputs (the engine server's resolver), so a
        bad image or a failed encode is reported like any other failure."""
        handoff = req.handoff
        assert handoff is not None
        rid = req.request_id
        result = PrefillResult(request_id=rid, transfer_id=handoff.transfer_id, prefill_instance_id=self._instance_id)
        endpoint = KVEndpoint(**msgspec.structs.asdict(handoff.endpoint))
        opening = asyncio.create_task(
            self._sender.open(endpoint, handoff.transfer_id, handoff.num_blocks, timeout_s=handoff.lease_s, token=handoff.transfer_token)
        )
        transfer = None
        shipped = handoff.skip_blocks  # prompt blocks the decode instance has (or was sent)
        prompt_blocks = -(-len(req.prompt_token_ids) // self._block_size)
        told_decode = False

        async def ship(block_ids: list[int], upto: int) -> None:
            nonlocal transfer, shipped
            if upto <= shipped:
                return
            if transfer is None:
                transfer = await opening
            await transfer.send(block_ids[shipped:upto], shipped - handoff.skip_blocks)
            shipped = upto

        try:
            last = None
            extra = {"multimodal": await images()} if images is not None else {}
            stream = self._engine.generate(rid, req.prompt_token_ids, params, prefill_only=True, **extra)
            async with contextlib.aclosing(stream):
                async for out in stream:
                    if out.error:
                        raise RuntimeError(out.error)
                    if out.finished:
                        last = out
                        break
                    if out.kv is not None:
                        await ship(out.kv.block_ids, min(out.kv.num_tokens // self._block_size, prompt_blocks))
            if last is None:
                raise RuntimeError("the engine ended the prefill without an output")
            first = last.outputs[0]
            if not first.token_ids:
                raise RuntimeError(f"the prefill ended without a token ({first.finish_reason})")
            handed_off = first.finish_reason == HANDOFF
            result.token_id = first.token_ids[0]
            result.num_cached_tokens = last.num_cached_tokens
            result.finished = not handed_off
            if last.kv is not None and last.kv.first_token_logprobs is not None:
                lp = last.kv.first_token_logprobs
                result.logprobs = (float(lp[0]), int(lp[1]), list(lp[2]), list(lp[3]))
            # Decode first: if this process dies between the two, the decode instance
            # still knows the token the client may be about to see (it re-sends it).
            await self._nc.publish(subjects.prefilled_subject(handoff.decode_instance_id), encode(result))
            told_decode = True
            await publish(req.reply_to, self._first_delta(req, last, handed_off))
            if not handed_off:
                return
            if self._stall_s:
                log.warning("fault injection: stalling transfer %s for %.1f s", handoff.transfer_id, self._stall_s)
                await asyncio.sleep(self._stall_s)
            assert last.kv is not None
            await ship(last.kv.block_ids, prompt_blocks)
            if transfer is None:
                transfer = await opening
            stats = await transfer.finish()
            self._count(stats.backend, stats.nbytes, stats.seconds)
        except asyncio.CancelledError:
            await self._abort(transfer, "cancelled")
            raise
        except Exception as exc:  # noqa: BLE001 - the decode side must hear about any failure
            log.warning("hand-off %s to %s failed: %s", handoff.transfer_id, handoff.decode_instance_id, exc)
            backend = transfer.backend if transfer is not None else "unknown"
            self._counters.transfers.setdefault(backend, TransferCounters()).failures += 1
            await self._abort(transfer, str(exc))
            if not told_decode:
                result.error = ErrorInfo(ErrorCode.ENGINE_ERROR, f"prefill on {self._instance_id} failed: {exc}")
                with contextlib.suppress(Exception):
                    await self._nc.publish(subjects.prefilled_subject(handoff.decode_instance_id), encode(result))
        finally:
            if not opening.done():
                opening.cancel()
            # Idempotent; queued after the stream's abort, so whatever state the engine
            # reached (still prefilling, or handed off), no block stays held.
            self._engine.release_kv(rid)

    def _first_delta(self, req: GenerateRequest, out: Any, handed_off: bool) -> TokenDelta:
        delta = delta_from_output(out, 0)
        if handed_off:
            delta.finished = False
            for choice in delta.choices:
                choice.finish_reason = None
                choice.stop_reason = None
        else:
            delta.usage = Usage(len(req.prompt_token_ids), 1, out.num_cached_tokens)
        return delta

    def _count(self, backend: str, nbytes: int, seconds: float) -> None:
        c = self._counters.transfers.setdefault(backend, TransferCounters())
        c.transfers += 1
        c.bytes += nbytes
        c.seconds += seconds

    @staticmethod
    async def _abort(transfer: Any, reason: str) -> None:
        if transfer is not None:
            with contextlib.suppress(TransferError, OSError, asyncio.CancelledError, RuntimeError):
                await asyncio.wait_for(transfer.abort(reason), 2)
