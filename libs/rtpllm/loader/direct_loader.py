"""CPU destinations: each extent is one scatter preadv straight into destination memory."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

from rtpllm.loader.destinations import CastAssembler, dest_bytes, host_view
from rtpllm.loader.file_reader import CheckpointFile, scatter_read
from rtpllm.loader.load_plan import Extent, LoadPlan


class DirectLoader:
    """CPU destinations: one scatter preadv per extent straight into destination memory."""

    def __init__(
        self,
        plan: LoadPlan,
        files: dict[Path, CheckpointFile],
        threads: int,
        progress: Callable[[int, int], None] | None,
    ):
        self.plan, self.files, self.threads, self.progress = plan, files, threads, progress
        self.cast = CastAssembler(plan)
        self.views = {t: host_view(dest_bytes(t)) for t in plan.tensors if t.direct and t.nbytes}
        gaps = [0]
        for e in plan.extents:
            pos = e.offset + e.pieces[0].extent_offset
            for p in e.pieces:
                gaps.append(e.offset + p.extent_offset - pos)
                pos = e.offset + p.extent_offset + p.nbytes
        # Unneeded bytes inside an extent land here; threads share it because nobody reads it.
        self.scratch = memoryview(bytearray(max(gaps)))

    def run(self) -> None:
        done = 0
        with ThreadPoolExecutor(self.threads, thread_name_prefix="rtpllm-load") as pool:
            futures = {pool.submit(self._load, e): e for e in self.plan.extents}
            try:
                for fut in as_completed(futures):
                    fut.result()
                    done += futures[fut].nbytes
                    if self.progress is not None:
                        self.progress(done, self.plan.read_bytes)
            except BaseException:
                for fut in futures:
                    fut.cancel()
                raise

    def _load(self, e: Extent) -> None:
        start = pos = e.offset + e.pieces[0].extent_offset
        bufs: list[memoryview] = []
        for p in e.pieces:
            at = e.offset + p.extent_offset
            if at > pos:
                bufs.append(self.scratch[: at - pos])
            t = p.tensor
            view = self.views[t] if t.direct else host_view(self.cast.temp(t))
            bufs.append(view[p.tensor_offset : p.tensor_offset + p.nbytes])
            pos = at + p.nbytes
        scatter_read(self.files[e.path], bufs, start)
        for p in e.pieces:
            if not p.tensor.direct:
                self.cast.piece_done(p.tensor)
