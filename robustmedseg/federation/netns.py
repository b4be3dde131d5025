"""A private virtual network of Linux network namespaces: one researcher host and N node hosts.

Used by the deployment rehearsal (:mod:`robustmedseg.federation.rehearsal`).  Everything lives inside
namespaces this object creates (root is needed: ``ip netns add``)::

    namespace <prefix>-r       researcher host: bridge br0 with the researcher's address (10.R.0.1/24)
    namespace <prefix>-n<k>    node host k: eth0 (10.R.0.<10+k>/24), the other end v<k> of its veth pair
                               is a port of br0 in the researcher's namespace

No interface, address or route is created outside these namespaces (each veth pair is created with
both ends already inside them), so nothing reaches another host, and :meth:`VirtualNetwork.down`
(``ip netns del``, after killing every process still inside them) removes everything.  A node's
link is cut by setting its bridge port down, slowed with ``tc`` (netem delay, or a tbf rate limit where the
kernel has no netem) on its own interface.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from typing import Dict, List, Mapping, Optional, Sequence

from robustmedseg.errors import InputError


def namespaces_available() -> Optional[str]:
    """``None`` when network namespaces can be made here, else the one-line reason why not."""
    if os.name != "posix" or not hasattr(os, "geteuid"):
        return "network namespaces need Linux"
    if shutil.which("ip") is None:
        return "the 'ip' command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add)"
    probe = f"rmsprobe-{os.getpid()}"
    res = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if res.returncode != 0:
        return f"ip netns add failed: {' '.join(res.stderr.split())[:160]}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    res = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and res.returncode != 0:
        raise InputError(f"'ip {' '.join(args)}' failed: {' '.join(res.stderr.split())[:200]}")
    return res


class VirtualNetwork:
    """Researcher + ``n_nodes`` node namespaces on one bridge (see the module docstring)."""

    def __init__(self, n_nodes: int, prefix: Optional[str] = None, subnet: int = 231):
        self.prefix = prefix or f"rms{os.getpid() % 100000}"
        self.n_nodes = int(n_nodes)
        self.subnet = int(subnet)
        self.researcher = f"{self.prefix}-r"
        self.nodes: List[str] = [f"{self.prefix}-n{k}" for k in range(1, self.n_nodes + 1)]
        self._made: List[str] = []

    # ------------------------------------------------------------------ addresses
    @property
    def researcher_ip(self) -> str:
        return f"10.{self.subnet}.0.1"

    def node_ip(self, k: int) -> str:
        """Address of node host ``k`` (1-based)."""
        return f"10.{self.subnet}.0.{10 + k}"

    # ------------------------------------------------------------------ life cycle
    def up(self) -> "VirtualNetwork":
        existing = set(_ip("netns", "list", check=False).stdout.split())
        clash = [ns for ns in [self.researcher, *self.nodes] if ns in existing]
        if clash:
            raise InputError(f"network namespace(s) {clash} already exist; remove them (ip netns del) or choose "
                             "another prefix")
        for ns in [self.researcher, *self.nodes]:
            _ip("netns", "add", ns)
            self._made.append(ns)
            _ip("-n", ns, "link", "set", "lo", "up")
        r = self.researcher
        _ip("-n", r, "link", "add", "br0", "type", "bridge")
        _ip("-n", r, "addr", "add", f"{self.researcher_ip}/24", "dev", "br0")
        _ip("-n", r, "link", "set", "br0", "up")
        for k, ns in enumerate(self.nodes, start=1):
            _ip("-n", r, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", r, "link", "set", f"v{k}", "master", "br0")
            _ip("-n", r, "link", "set", f"v{k}", "up")
            _ip("-n", ns, "addr", "add", f"{self.node_ip(k)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
        return self

    def add_host(self, linked: bool = True) -> str:
        """One more namespace: a further host on the bridge (``linked``; the next node address) or an isolated
        host that has only its loopback interface.  Removed by :meth:`down` like the others."""
        k = len(self.nodes) + 1
        ns = f"{self.prefix}-{'n' if linked else 'l'}{k}"
        _ip("netns", "add", ns)
        self._made.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")
        if linked:
            _ip("-n", self.researcher, "link", "add", f"v{k}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            _ip("-n", self.researcher, "link", "set", f"v{k}", "master", "br0")
            _ip("-n", self.researcher, "link", "set", f"v{k}", "up")
            _ip("-n", ns, "addr", "add", f"{self.node_ip(k)}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            self.nodes.append(ns)
        return ns

    def add_researcher_address(self, last: int) -> str:
        """A second address ``10.R.0.<last>`` of the researcher host (on its bridge); returns it."""
        address = f"10.{self.subnet}.0.{int(last)}"
        _ip("-n", self.researcher, "addr", "add", f"{address}/24", "dev", "br0")
        return address

    def pids(self, ns: str) -> List[int]:
        """Processes running inside namespace ``ns``."""
        res = _ip("netns", "pids", ns, check=False)
        return [int(p) for p in res.stdout.split() if p.isdigit()]

    def kill_all(self, ns: str, sig: int = signal.SIGKILL, wait: float = 10.0) -> None:
        """Send ``sig`` to every process inside ``ns`` (a host crash with SIGKILL) and wait until they are gone."""
        for pid in self.pids(ns):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
        deadline = time.time() + wait
        while self.pids(ns) and time.time() < deadline:
            time.sleep(0.2)
        if sig != signal.SIGKILL and self.pids(ns):
            self.kill_all(ns, signal.SIGKILL, wait)

    def down(self) -> None:
        """Kill every process inside the namespaces and delete them (idempotent; also after a failure)."""
        for ns in reversed(self._made):
            self.kill_all(ns, signal.SIGKILL, wait=10.0)
            _ip("netns", "del", ns, check=False)
        self._made = []

    def __enter__(self) -> "VirtualNetwork":
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()

    # ------------------------------------------------------------------ faults
    def cut(self, k: int) -> None:
        """Cut node ``k``'s link (its bridge port goes down: packets in both directions are lost)."""
        _ip("-n", self.researcher, "link", "set", f"v{k}", "down")

    def restore(self, k: int) -> None:
        _ip("-n", self.researcher, "link", "set", f"v{k}", "up")

    def slow(self, k: int, delay_ms: int = 300, rate_kbit: int = 512) -> str:
        """Make node ``k``'s link slow (what it sends): ``tc netem delay`` where the kernel has netem, else a
        token-bucket rate limit (``tc tbf``: big messages queue, i.e. are delayed).  Returns what was set."""
        ns = self.nodes[k - 1]
        netem = ["tc", "qdisc", "replace", "dev", "eth0", "root", "netem", "delay", f"{int(delay_ms)}ms"]
        if subprocess.run(self.command(ns, netem), capture_output=True).returncode == 0:
            return f"tc netem delay {int(delay_ms)}ms"
        self.exec_check(ns, ["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{int(rate_kbit)}kbit",
                             "burst", "32kbit", "latency", "60s"])
        return f"tc tbf rate {int(rate_kbit)}kbit (this kernel has no netem)"

    def unslow(self, k: int) -> None:
        self.exec_check(self.nodes[k - 1], ["tc", "qdisc", "del", "dev", "eth0", "root"], ok_codes=(0, 2))

    # ------------------------------------------------------------------ processes
    @staticmethod
    def command(ns: str, argv: Sequence[str]) -> List[str]:
        """``argv`` run inside namespace ``ns`` (``ip netns exec`` executes it in place: same PID)."""
        return ["ip", "netns", "exec", ns, *argv]

    def exec_check(self, ns: str, argv: Sequence[str], ok_codes=(0,)) -> None:
        res = subprocess.run(self.command(ns, argv), capture_output=True, text=True)
        if res.returncode not in ok_codes:
            raise InputError(f"'{' '.join(argv)}' in {ns} failed: {' '.join(res.stderr.split())[:200]}")

    def popen(self, ns: str, argv: Sequence[str], env: Mapping[str, str], log=None, cwd=None) -> subprocess.Popen:
        return subprocess.Popen(self.command(ns, argv), env=dict(env), cwd=cwd, stdout=log or subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    def reachable(self, ns: str, address: str, port: int = 9, timeout: float = 2.0) -> bool:
        """Whether a TCP connection attempt from ``ns`` to ``address`` gets an answer (accepted or refused)
        within ``timeout`` seconds: the link works (no ``ping`` binary needed)."""
        code = ("import socket,sys\ns=socket.socket();s.settimeout(float(sys.argv[3]))\n"
                "try:\n s.connect((sys.argv[1],int(sys.argv[2])))\nexcept ConnectionRefusedError:\n pass\n"
                "except OSError:\n sys.exit(1)\n")
        res = subprocess.run(self.command(ns, [sys.executable, "-c", code, address, str(port), str(timeout)]),
                             capture_output=True)
        return res.returncode == 0

    def describe(self) -> Dict[str, str]:
        return {self.researcher: self.researcher_ip,
                **{ns: self.node_ip(k) for k, ns in enumerate(self.nodes, start=1)}}
