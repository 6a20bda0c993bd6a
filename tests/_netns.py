"""Hosts as Linux network namespaces, and nginx serving files in one, for the cluster tests.

A :class:`Network` is a bridge inside a namespace of its own plus one namespace per host, each
joined to the bridge by a veth pair, with an address of ``10.123.0.0/24`` on the host's end
(``eth0``) and nothing else: no route leaves these namespaces and the machine's own namespace is
not touched. Each host has a hostname of its own (``node-a``, ...: commands run in a UTS namespace
with that name) which every host resolves through a hosts file (``/etc/netns/NS/hosts``, which
``ip netns exec`` mounts over ``/etc/hosts``), so launchers find each other by name as on a cluster. ``Host.cut()`` sets the bridge end of a host's link down (``ip link set DEV down``),
``Host.kill_all()`` sends a signal to every process of the namespace (the host's own ``kill -9``).
Everything is removed by ``Network.close()`` (processes killed, namespaces deleted), which the
fixtures call in their finalizers, also after a failure.

:func:`netns_unavailable` / :func:`nginx_unavailable` return why a test cannot run here (not
root, no ``ip``, namespaces refused, no nginx), or None; the tests skip with that reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import textwrap
import time
from pathlib import Path

SUBNET = "10.123.0"
ETC_NETNS = Path("/etc/netns")  # per-namespace files that `ip netns exec` mounts over /etc
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
IP = shutil.which("ip") or next((p for p in ("/usr/sbin/ip", "/sbin/ip") if os.path.exists(p)), None)


def _ip(*args: str, check: bool = True, timeout: float = 20) -> subprocess.CompletedProcess:
    proc = subprocess.run([IP, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def netns_unavailable() -> str | None:
    """Why network-namespace hosts cannot be made here, or None when they can (a probe is made and removed)."""
    if IP is None:
        return "the 'ip' command (iproute2) is not installed (make cluster-deps installs it)"
    if os.geteuid() != 0:
        return "network namespaces need root (ip netns add); run the tests as root"
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        return "the 'unshare' and 'nsenter' commands (util-linux) are not installed"
    probe = f"intiprobe{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1")
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        return f"network namespaces with veth pairs and a bridge cannot be made here: {e}"
    finally:
        _ip("netns", "del", probe, check=False)
    return None


def nginx_unavailable() -> str | None:
    """Why nginx cannot serve the shards here, or None."""
    if NGINX is None:
        return "nginx is not installed (Debian: nginx-light; make cluster-deps installs it)"
    return None


class Host:
    """One namespace on the bridge: ``name``, its namespace ``ns``, its address ``addr``."""

    def __init__(self, net: Network, name: str, index: int) -> None:
        self.net, self.name, self.index = net, name, index
        self.ns = f"{net.prefix}{name}"
        self.addr = f"{SUBNET}.{index}"
        self.link = f"v{index}"  # the bridge's end of the veth pair (in the bridge's namespace)
        self.hostname = f"node-{name}"

    def cmd(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace, under its hostname (the same process: each step execs)."""
        return [IP, "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.hostname, *map(str, argv)]

    def cmd_keep_sys(self, argv: list[str]) -> list[str]:
        """Like :meth:`cmd` but with the machine's ``/sys`` (``ip netns exec`` mounts a fresh one, without the
        cgroup file systems): the network namespace entered with ``nsenter``, the hosts file bind-mounted in a
        private mount namespace."""
        script = f'mount --bind {ETC_NETNS / self.ns / "hosts"} /etc/hosts && hostname "$0" && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{self.ns}", "unshare", "--uts", "--mount", "sh", "-c", script,
                self.hostname, *map(str, argv)]

    def popen(self, argv: list[str], **kwargs) -> subprocess.Popen:
        """Start ``argv`` in this host, in a session of its own (so that its whole group can be signalled)."""
        return subprocess.Popen(self.cmd(argv), start_new_session=True, **kwargs)

    def run(self, argv: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(self.cmd(argv), timeout=timeout, capture_output=True, text=True, **kwargs)

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process of this host; returns how many there were."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return len(pids)

    def cut(self) -> None:
        """The host's network cable pulled: its link on the bridge goes down."""
        _ip("-n", self.net.bridge_ns, "link", "set", self.link, "down")

    def reconnect(self) -> None:
        _ip("-n", self.net.bridge_ns, "link", "set", self.link, "up")


def remove_stale() -> list[str]:
    """Delete the namespaces (and hosts files) that a killed test session left (``inti<PID>...`` whose PID is gone)."""
    removed = []
    for line in _ip("netns", "list", check=False).stdout.splitlines():
        match = re.match(r"(inti(\d+)[a-z]+)\b", line)
        if match and not Path(f"/proc/{match[2]}").exists():
            _ip("netns", "del", match[1], check=False)
            shutil.rmtree(ETC_NETNS / match[1], ignore_errors=True)
            removed.append(match[1])
    return removed


class Network:
    """A bridge in its own namespace and hosts attached to it; ``close()`` removes everything."""

    def __init__(self, prefix: str | None = None) -> None:
        remove_stale()
        self.prefix = prefix or f"inti{os.getpid()}"
        self.bridge_ns = f"{self.prefix}br"
        self.hosts: dict[str, Host] = {}
        _ip("netns", "add", self.bridge_ns)
        try:
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def add_host(self, name: str) -> Host:
        host = Host(self, name, len(self.hosts) + 1)
        self.hosts[name] = host
        _ip("netns", "add", host.ns)
        br = ["-n", self.bridge_ns]
        _ip(*br, "link", "add", host.link, "type", "veth", "peer", "name", "eth0", "netns", host.ns)
        _ip(*br, "link", "set", host.link, "master", "br0")
        _ip(*br, "link", "set", host.link, "up")
        _ip("-n", host.ns, "addr", "add", f"{host.addr}/24", "dev", "eth0")
        _ip("-n", host.ns, "link", "set", "eth0", "up")
        _ip("-n", host.ns, "link", "set", "lo", "up")
        self._write_hosts_files()
        return host

    def _write_hosts_files(self) -> None:
        lines = ["127.0.0.1 localhost", *(f"{h.addr} {h.hostname}" for h in self.hosts.values())]
        for host in self.hosts.values():
            etc = ETC_NETNS / host.ns
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text("\n".join(lines) + "\n")

    def close(self) -> None:
        """Kill every process in the hosts, then delete the namespaces (their links go with them)."""
        for host in self.hosts.values():
            for _ in range(20):
                if not host.kill_all():
                    break
                time.sleep(0.1)
        for ns in [h.ns for h in self.hosts.values()] + [self.bridge_ns]:
            _ip("netns", "del", ns, check=False)
            shutil.rmtree(ETC_NETNS / ns, ignore_errors=True)


def wait_for(predicate, timeout: float, what: str, interval: float = 0.1):
    """Poll ``predicate()`` until it returns something true; TimeoutError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Nginx:
    """nginx in ``host``, serving ``root`` at ``http://ADDR:PORT/`` (bound to that address only).

    Its config, pid file and logs live in ``workdir``; ``daemon off``, stopped by :meth:`stop`.
    ``/slow/`` serves the same files at ``slow_rate`` bytes/s per connection (paces a training run).
    """

    def __init__(self, host: Host, root: Path, workdir: Path, port: int = 8080, slow_rate: str = "64k") -> None:
        self.host, self.root, self.workdir, self.port = host, Path(root), Path(workdir), port
        self.url = f"http://{host.addr}:{port}"
        workdir.mkdir(parents=True, exist_ok=True)
        for sub in ("body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (workdir / sub).mkdir(exist_ok=True)
        w = workdir
        (w / "nginx.conf").write_text(textwrap.dedent(f"""\
            daemon off;
            user root;
            worker_processes 1;
            pid {w}/nginx.pid;
            error_log {w}/error.log warn;
            events {{ worker_connections 256; }}
            http {{
                access_log {w}/access.log;
                client_body_temp_path {w}/body;
                proxy_temp_path {w}/proxy;
                fastcgi_temp_path {w}/fastcgi;
                uwsgi_temp_path {w}/uwsgi;
                scgi_temp_path {w}/scgi;
                default_type application/octet-stream;
                sendfile on;
                server {{
                    listen {host.addr}:{port};
                    root {self.root};
                    location /slow/ {{ alias {self.root}/; limit_rate {slow_rate}; }}
                }}
            }}
            """))
        self.proc = host.popen([NGINX, "-p", str(w), "-c", str(w / "nginx.conf"), "-e", str(w / "error.log")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: self.proc.poll() is not None or (w / "nginx.pid").exists(), 20, "nginx to start")
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}: {self.proc.stderr.read()}"
                                   f"{(w / 'error.log').read_text() if (w / 'error.log').exists() else ''}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # graceful: the workers finish and exit with the master
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
