"""`rtpllm up`'s watch over its engine children: report and restart the ones that die,
and the ones that stay alive but unregistered; a dead kvstore or vision service is
restarted too.

A child can be alive and useless: a worker whose heartbeats stopped reaching the
gateway (wedged, or dropped and never back) serves nobody while its process looks
fine. So beside exit codes the supervisor reads the gateway's /instances: an engine
child whose instance id is missing from it for `unregistered_grace_s` (after it was
registered once), or that never registers within `register_grace_s` of its start, is
reported and replaced. Restarts back off (1 s, doubling to 60 s) while a role keeps
failing, so a crash loop does not spin.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from rtpllm.runtime.processes import ManagedProcess, http_json
from rtpllm.runtime.stack import Stack


@dataclass
class _Watch:
    started: float
    registered_once: bool = False
    missing_since: float | None = None


@dataclass
class Supervisor:
    """Call `tick()` every half second or so from the `up` loop."""

    stack: Stack
    say: Callable[[str], None]
    register_grace_s: float = 600.0  # a first start loads the model: generous
    unregistered_grace_s: float = 15.0  # several leases: a re-admission would have happened
    clock: Callable[[], float] = time.monotonic
    _watches: dict[str, _Watch] = field(default_factory=dict)
    _backoff_s: dict[str, float] = field(default_factory=dict)
    _not_before: dict[str, float] = field(default_factory=dict)
    restarts: int = 0

    def registered_ids(self) -> set[str] | None:
        """Instance ids the gateway lists, or None when it does not answer."""
        try:
            status, body = http_json(f"{self.stack.url}/instances", timeout=2.0, headers=self.stack.auth_headers)
        except Exception:  # noqa: BLE001 - the gateway busy or restarting: judge nothing now
            return None
        if status != 200 or not isinstance(body, dict):
            return None
        return {item["instance_id"] for item in body.get("instances", [])}

    def tick(self) -> None:
        now = self.clock()
        registered = self.registered_ids()
        for proc in list(self.stack.workers):
            watch = self._watches.setdefault(proc.name, _Watch(started=now))
            role = proc.name.rsplit("-", 1)[0]
            if not proc.alive:
                self._replace(proc, role, f"{proc.name} exited (code {proc.returncode}); last output:\n{proc.tail(10)}")
                continue
            if registered is None:
                continue
            if self.stack.instance_ids.get(proc.name) in registered:
                watch.registered_once, watch.missing_since = True, None
                self._backoff_s.pop(role, None)  # serving again: the next failure starts over
                continue
            if not watch.registered_once:
                if now - watch.started > self.register_grace_s:
                    self._replace(proc, role, f"{proc.name} never registered with the gateway in {self.register_grace_s:.0f} s; restarting it")
                continue
            if watch.missing_since is None:
                watch.missing_since = now
            elif now - watch.missing_since > self.unregistered_grace_s:
                self._replace(proc, role, f"{proc.name} is alive but has not been registered with the gateway for {now - watch.missing_since:.0f} s; restarting it")
        kvstore = self.stack.kvstore
        if kvstore is not None and not kvstore.alive and self._due("kvstore", now):
            self.say(f"kvstore exited (code {kvstore.returncode}); restarting it (engines miss their KV tiers meanwhile)")
            try:
                self.stack.start_kvstore()
                self.restarts += 1
            except Exception as exc:  # noqa: BLE001 - try again after the backoff
                self.say(f"kvstore restart failed: {exc}")
        for proc in list(self.stack.visions):
            if proc.alive or not self._due("vision", now):
                continue
            self.say(f"{proc.name} exited (code {proc.returncode}); restarting it (engines encode images themselves meanwhile)")
            self.stack.visions.remove(proc)
            try:
                self.stack.add_vision(wait=False)
                self.restarts += 1
            except Exception as exc:  # noqa: BLE001 - try again after the backoff
                self.say(f"vision restart failed: {exc}")

    def _due(self, key: str, now: float) -> bool:
        if now < self._not_before.get(key, 0.0):
            return False
        backoff = self._backoff_s.get(key, 0.5) * 2
        self._backoff_s[key] = min(backoff, 60.0)
        self._not_before[key] = now + backoff
        return True

    def _replace(self, proc: ManagedProcess, role: str, why: str) -> None:
        now = self.clock()
        if not self._due(role, now):
            return
        self.say(why)
        if proc.alive:
            proc.signal(signal.SIGTERM)
            if proc.wait(10) is None:
                proc.kill()
                proc.wait(5)
        self.stack.workers.remove(proc)
        self._watches.pop(proc.name, None)
        new = self.stack.add_worker(role=role)
        self._watches[new.name] = _Watch(started=now)
        self.restarts += 1
        self.say(f"started {new.name} in its place")
