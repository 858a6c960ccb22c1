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


WILDCARD_HOSTS = ("", "0.0.0.0", "::")


def advertised_address(bind_host: str) -> str:
    """The address peers should dial for a listener bound to `bind_host`.

    A wildcard bind listens on every interface, which is no address a peer can use; this
    machine's (or container's) own address is announced instead: its hostname resolved
    (Docker and Kubernetes write the container's IP into /etc/hosts), else the hostname
    itself. An IP rather than the hostname, because a container's hostname is its short
    id, which other containers' DNS does not always know."""
    if bind_host not in WILDCARD_HOSTS:
        return bind_host
    name = socket.gethostname()
    family = socket.AF_INET6 if bind_host == "::" else socket.AF_INET
    try:
        infos = socket.getaddrinfo(name, None, family, socket.SOCK_STREAM)
    except OSError:
        return name
    addresses = [info[4][0] for info in infos]
    # A hostname mapped to loopback (a laptop's /etc/hosts) is no use to a remote peer,
    # but then every peer is local anyway; prefer a routable address where there is one.
    routable = [a for a in addresses if not a.startswith("127.") and a != "::1"]
    return (routable or addresses or [name])[0]


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)
