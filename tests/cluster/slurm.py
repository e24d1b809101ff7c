"""A two-node Slurm cluster on this one host, for the tests and for trying the README's Slurm scripts by hand.

Two `slurmd` daemons (nodes n1 and n2, 2 CPUs each, one partition `debug`), one `slurmctld` and a `munged` with
a fresh key, all in the foreground under a folder of their own (state, spool, logs, sockets) on free ports;
`stop()` ends them by the PIDs it started. The node names must resolve for torchrun's rendezvous endpoint
(`head=$(scontrol show hostnames ...)`): where `n1`/`n2` do not, `127.0.0.1 n1 n2` is appended to /etc/hosts
(root only; otherwise start() says so and the caller skips).

    python tests/cluster/slurm.py start /tmp/slurm   # prints `export SLURM_CONF=...`; Ctrl-C or kill stops it
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

NODES = ("n1", "n2")
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


class Unavailable(RuntimeError):
    """This host cannot run the cluster (packages missing, not root): tests skip with this reason."""


@dataclass
class SlurmCluster:
    folder: Path
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        """The environment a client (sbatch, squeue, ...) needs to reach this cluster."""
        return os.environ | {"SLURM_CONF": str(self.folder / "slurm.conf")}

    def run(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=check, timeout=timeout)

    def stop_node(self, node: str) -> None:
        """SIGKILL one node's slurmd (the node is lost)."""
        _end(self.processes.pop(f"slurmd-{node}"), signal.SIGKILL)

    def start_node(self, node: str) -> None:
        self.processes[f"slurmd-{node}"] = self._daemon(f"slurmd-{node}", command("slurmd"), "-D", "-N", node,
                                                         "-f", str(self.folder / "slurm.conf"))

    def stop(self) -> None:
        """Cancel every job, then end the daemons this cluster started (by PID, never by name)."""
        if "slurmctld" in self.processes:
            self.run("scancel", "--user", os.environ.get("USER", "root"), "--full", check=False)
            time.sleep(0.5)
        for name in sorted(self.processes, key=lambda n: n != "slurmd-n1" and n != "slurmd-n2"):
            _end(self.processes[name], signal.SIGTERM)
        self.processes.clear()

    def wait_idle(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            states = self.run("sinfo", "--noheader", "--Node", "--format", "%N %t", check=False).stdout.split()
            if states[1::2] == ["idle"] * len(NODES):
                return
            time.sleep(0.3)
        raise RuntimeError(f"the Slurm nodes did not come up in {timeout:.0f} s: {states}; see {self.folder}/*.log")

    def _daemon(self, name: str, *command: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.out", "ab")
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)


def _end(process: subprocess.Popen, sig: int) -> None:
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def check_available() -> None:
    missing = [d for d in DAEMONS if command(d) is None]
    if missing:
        raise Unavailable(f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurm-wlm munge")
    if not _resolvable(NODES):
        if os.geteuid() != 0:
            raise Unavailable(f"the node names {', '.join(NODES)} do not resolve and only root may add them to "
                              "/etc/hosts")
        with open("/etc/hosts", "a") as hosts:
            hosts.write(f"127.0.0.1 {' '.join(NODES)}  # neoxko's local Slurm cluster (tests/cluster/slurm.py)\n")


def command(name: str) -> str | None:
    """A command's path; the daemons live in /usr/sbin, which a non-root PATH may leave out."""
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def _resolvable(names) -> bool:
    try:
        return all(socket.gethostbyname(n) for n in names)
    except OSError:
        return False


def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def write_config(folder: Path, ctld_port: int, node_ports: list[int]) -> Path:
    host = socket.gethostname()
    nodes = "\n".join(f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={p} CPUs=2 RealMemory=8000 State=UNKNOWN"
                      for n, p in zip(NODES, node_ports, strict=True))
    conf = folder / "slurm.conf"
    conf.write_text(f"""\
ClusterName=neoxko
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={folder}/munge.socket
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool/%n
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd-%n.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
ReturnToService=2
SlurmdTimeout=10
KillWait=10
MinJobAge=600
InactiveLimit=0
Waittime=0
{nodes}
PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")
    return conf


def start(folder: Path) -> SlurmCluster:
    """Start munged, slurmctld and the two slurmd under folder; returns when both nodes are idle."""
    check_available()
    folder = Path(folder).resolve()
    for sub in ("state", "spool/n1", "spool/n2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    key = folder / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    ctld, *nodes = free_ports(1 + len(NODES))
    conf = write_config(folder, ctld, nodes)
    cluster = SlurmCluster(folder)
    try:
        cluster.processes["munged"] = cluster._daemon(
            "munged", command("munged"), "--foreground", "--force", f"--key-file={key}", f"--socket={folder}/munge.socket",
            f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log", f"--seed-file={folder}/munge.seed")
        _wait_for(folder / "munge.socket", cluster.processes["munged"], "munged")
        cluster.processes["slurmctld"] = cluster._daemon("slurmctld", command("slurmctld"), "-D", "-i", "-f", str(conf))
        for node in NODES:
            cluster.start_node(node)
        cluster.wait_idle()
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(path: Path, process: subprocess.Popen, name: str, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start; see {path.parent}/{name}.out")
        time.sleep(0.05)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "start":
        sys.exit("usage: python tests/cluster/slurm.py start FOLDER")
    cluster = start(Path(sys.argv[2]))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` stops the cluster too
    print(f"export SLURM_CONF={cluster.folder / 'slurm.conf'}   # two nodes up; Ctrl-C stops the cluster", flush=True)
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        cluster.stop()
