"""A two-node Slurm cluster for the tests: munged, slurmctld and one slurmd per network-namespace host.

Everything lives in a temporary folder: a generated munge key, munged with its own socket, pid,
log and seed files, a ``slurm.conf`` for these hosts (proctrack/linuxproc, task/none,
select/cons_tres, its own ports, state and spool folders). The daemons run in the foreground
(``-D``), started by :class:`SlurmCluster` and stopped by :meth:`SlurmCluster.stop`, also after a
failure. Client commands (``sbatch``, ``scontrol``) run in the first host with ``SLURM_CONF`` set.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import textwrap
from pathlib import Path

from _netns import Host, wait_for

SLURM_BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo", "squeue", "scancel", "srun", "munged", "mungekey")


def which(name: str) -> str | None:
    """The path of a Slurm / munge program (sbin folders included), or None."""
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)),
                                      None)


def slurm_unavailable() -> str | None:
    """Why the Slurm test cluster cannot run here, or None."""
    missing = [b for b in SLURM_BINARIES if which(b) is None]
    if missing:
        return f"Slurm / munge not installed (missing {', '.join(missing)}; Debian: slurm-wlm munge, make cluster-deps)"
    if os.geteuid() != 0:
        return "the Slurm test cluster runs its daemons as root"
    return None


class SlurmCluster:
    """munged + slurmctld on ``hosts[0]`` + a slurmd on each host; partition ``debug`` holds them all."""

    def __init__(self, hosts: list[Host], workdir: Path, port: int = 26817, cpus: int = 2) -> None:
        self.hosts, self.dir = hosts, Path(workdir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf = self.dir / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: list[subprocess.Popen] = []
        try:
            self._start_munge()
            self._write_conf(port, cpus)
            ctl = hosts[0]
            self._start(ctl, [which("slurmctld"), "-D", "-i", "-f", self.conf], "slurmctld")
            for host in hosts:
                # slurmd's cgroup plugin wants the machine's /sys/fs/cgroup (even with proctrack/linuxproc),
                # which `ip netns exec` hides
                argv = host.cmd_keep_sys([which("slurmd"), "-D", "-N", host.hostname, "-f", self.conf])
                self._start(None, argv, f"slurmd-{host.name}")
            wait_for(self._nodes_idle, 60, "the Slurm nodes to be idle", interval=0.5)
        except BaseException:
            self.stop()
            raise

    def _start(self, host: Host | None, argv: list, name: str) -> None:
        log = open(self.dir / f"{name}.out", "w")
        argv = [str(a) for a in argv]
        if host is None:
            proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        else:
            proc = host.popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        log.close()
        self.procs.append(proc)

    def _start_munge(self) -> None:
        d = self.dir / "munge"
        d.mkdir(mode=0o700, exist_ok=True)
        key = d / "munge.key"
        subprocess.run([which("mungekey"), "--create", "--keyfile", str(key)], check=True, timeout=30,
                       capture_output=True)
        self.munge_socket = d / "munge.socket"
        self._start(None, [which("munged"), "--foreground", "--force", f"--key-file={key}",
                           f"--socket={self.munge_socket}", f"--pid-file={d / 'munged.pid'}",
                           f"--log-file={d / 'munged.log'}", f"--seed-file={d / 'munged.seed'}"], "munged")
        wait_for(lambda: self.munge_socket.exists() or self.procs[-1].poll() is not None, 20, "munged to start")
        if self.procs[-1].poll() is not None:
            raise RuntimeError(f"munged exited: {(self.dir / 'munged.out').read_text()}")

    def _write_conf(self, port: int, cpus: int) -> None:
        d = self.dir
        for sub in ["ctld-state", *(f"spool-{h.hostname}" for h in self.hosts)]:
            (d / sub).mkdir(exist_ok=True)
        nodes = "\n".join(f"NodeName={h.hostname} NodeAddr={h.addr} CPUs={cpus} State=UNKNOWN" for h in self.hosts)
        names = ",".join(h.hostname for h in self.hosts)
        self.conf.write_text(textwrap.dedent(f"""\
            ClusterName=intitest
            SlurmctldHost={self.hosts[0].hostname}({self.hosts[0].addr})
            SlurmUser=root
            SlurmdUser=root
            SlurmctldPort={port}
            SlurmdPort={port + 1}
            AuthType=auth/munge
            CredType=cred/munge
            AuthInfo=socket={self.munge_socket}
            StateSaveLocation={d}/ctld-state
            SlurmdSpoolDir={d}/spool-%n
            SlurmctldPidFile={d}/slurmctld.pid
            SlurmdPidFile={d}/slurmd-%n.pid
            SlurmctldLogFile={d}/slurmctld.log
            SlurmdLogFile={d}/slurmd-%n.log
            ProctrackType=proctrack/linuxproc
            TaskPlugin=task/none
            SelectType=select/cons_tres
            SelectTypeParameters=CR_CPU
            MpiDefault=none
            ReturnToService=2
            SchedulerType=sched/builtin
            AccountingStorageType=accounting_storage/none
            JobAcctGatherType=jobacct_gather/none
            JobCompType=jobcomp/none
            SlurmctldTimeout=30
            SlurmdTimeout=60
            MessageTimeout=20
            KillWait=60
            MinJobAge=600
            {nodes}
            PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP
            """))

    def command(self, argv: list, timeout: float = 30) -> subprocess.CompletedProcess:
        """A client command on the first host (where the controller is)."""
        proc = self.hosts[0].run([which(str(argv[0])) or argv[0], *argv[1:]], timeout=timeout, env=self.env)
        if proc.returncode != 0:
            raise RuntimeError(f"{argv} failed ({proc.returncode}): {proc.stderr.strip()}\n{self.logs()}")
        return proc

    def _nodes_idle(self) -> bool:
        for p in self.procs:
            if p.poll() is not None:
                raise RuntimeError(f"a Slurm daemon exited ({p.args[-6:]}, status {p.returncode})\n{self.logs()}")
        proc = self.hosts[0].run([which("sinfo"), "-h", "-o", "%T"], timeout=20, env=self.env)
        states = proc.stdout.split()
        return proc.returncode == 0 and len(states) > 0 and all(s == "idle" for s in states)

    def job_state(self, job: str) -> dict[str, str]:
        """``scontrol show job`` as a mapping (JobState, RestartCnt, ExitCode, ...)."""
        out = self.command(["scontrol", "show", "job", "-o", job]).stdout
        return dict(f.split("=", 1) for f in out.split() if "=" in f)

    def logs(self, tail: int = 2000) -> str:
        parts = []
        for path in sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")):
            parts.append(f"--- {path.name}:\n{path.read_text(errors='replace')[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Stop the daemons (SIGTERM, then SIGKILL after 15 s) and every job process left in the hosts."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in reversed(self.procs):
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)
        for host in self.hosts:
            host.kill_all()
