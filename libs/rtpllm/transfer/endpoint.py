"""Where a decode instance receives KV: what it announces over NATS."""

from __future__ import annotations

import functools
import os
import socket

import msgspec

BACKENDS = ("cuda_ipc", "shm", "tcp")
SHM_DIR = "/dev/shm"


class KVEndpoint(msgspec.Struct):
    """A KVReceiver's address and capabilities; travels inside NATS messages.

    `host`/`port`: the TCP listener every backend's control connection goes to.
    `host_id`: names the machine, so a sender can tell it shares the host (shm, cuda_ipc).
    `device`: the receiver pool's device, "cpu" or "cuda:N".
    `backends`: what the receiver accepts, a subset of BACKENDS.
    """

    host: str
    port: int
    host_id: str
    device: str
    backends: list[str]


@functools.cache
def local_host_id() -> str:
    """Hostname plus the kernel's boot id: equal on two processes of one running machine
    (a container with its own hostname counts as another host, which keeps shm/IPC away
    from namespaces that may not share /dev/shm)."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            boot = f.read().strip()
    except OSError:
        boot = "no-boot-id"
    return f"{socket.gethostname()}/{boot}"


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)
