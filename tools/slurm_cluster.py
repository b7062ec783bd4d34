"""A real Slurm cluster on this machine, for the tests and the preemption benchmark: munge, slurmctld and one
slurmd on localhost, or two slurmd "nodes" in network namespaces. Everything lives under one directory; every
daemon started is stopped by its PID. Needs root and Debian's slurmctld, slurmd, slurm-client and munge
(installed when missing).

    python tools/slurm_cluster.py [--nodes 2]   # start one by hand; prints SLURM_CONF, Ctrl-C stops it

The facts behind the configuration (no cgroups here, `localhost` names, RealMemory at most what `slurmd -C`
reports, `EnforcePartLimits`, namespaces entered with nsenter) are in the project's Slurm notes.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
BRIDGE, SUBNET = "llmbr0", "10.200.0"
FAKE_GPU_FILES = ["/dev/null", "/dev/zero", "/dev/full", "/dev/urandom"]


class SlurmUnavailable(RuntimeError):
    """Why a cluster cannot be started here (not root, no apt, ...): the tests skip with this message."""


def run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}): {(r.stderr or r.stdout).strip()[-800:]}")
    return r


def install() -> None:
    """apt-get install the daemons when missing."""
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    if os.geteuid() != 0:
        raise SlurmUnavailable("Slurm is not installed and this is not root: run the tests as root (CI does)")
    if not shutil.which("apt-get"):
        raise SlurmUnavailable("Slurm is not installed and there is no apt-get to install it")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run("apt-get", "update", "-qq", env=env)
    run("apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES, env=env)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gone(pid: int) -> bool:
    """True when the process has exited (a zombie counts: a sandbox's PID 1 may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return True
    return state == "Z"


class Cluster:
    """Start with `start()`, stop with `stop()`; `env` is what sbatch/squeue/scontrol need (SLURM_CONF)."""

    def __init__(self, nodes: int = 1):
        if os.geteuid() != 0:
            raise SlurmUnavailable("a Slurm cluster needs root (daemons, munge key): run the tests as root (CI does)")
        self.nodes = nodes
        self.dir = Path(tempfile.mkdtemp(prefix="slurm-"))  # in /tmp: the munge user must reach its files below it
        self.dir.chmod(0o755)
        self.pids: list[tuple[str, int]] = []
        self.netns: list[str] = []
        # on a multi-node cluster the last node's slurmd (and every task it starts) sees an empty private tmpfs
        # here, not what the other nodes see: a directory that node does not share
        self.unshared = self.dir / "unshared"
        self.made_netns_dir = False
        self.held_since: dict[tuple, float] = {}
        # sbatch passes its environment on to the job: none of another launcher's variables
        launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
        self.env = {k: v for k, v in os.environ.items() if k not in launcher}
        self.env["SLURM_CONF"] = str(self.dir / "slurm.conf")

    # ---- bring-up -------------------------------------------------------------------------------------------
    def start(self) -> Cluster:
        install()
        for sub in ("state", "spool", "log", "run/munge"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        try:
            self._start_munge()
            names = self._network() if self.nodes > 1 else ["localhost"]
            self._write_conf(names)
            self._daemon("slurmctld", ["slurmctld", "-f", self.env["SLURM_CONF"]], self.dir / "slurmctld.pid")
            for name in names:
                (self.dir / "spool" / name).mkdir(exist_ok=True)
                cmd = ["slurmd", "-f", self.env["SLURM_CONF"], "-N", name]
                if name == names[-1] and self.nodes > 1:
                    self.unshared.mkdir()
                    mount = f'mount -t tmpfs unshared "{self.unshared}" && exec "$@"'
                    cmd = ["unshare", "--mount", "--propagation", "private", "sh", "-c", mount, "sh", *cmd]
                if name != "localhost":
                    cmd = ["nsenter", f"--net=/run/netns/{name}", *cmd]
                self._daemon(f"slurmd {name}", cmd, self.dir / f"slurmd.{name}.pid")
            self._wait_idle(names)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_munge(self) -> None:
        key, sock = self.dir / "munge.key", self.dir / "run/munge/munge.socket"
        run("mungekey", "--create", f"--keyfile={key}")
        shutil.chown(key, "munge", "munge")
        key.chmod(0o400)
        for d in (self.dir / "run/munge", self.dir / "log"):
            shutil.chown(d, "munge", "munge")
        pidfile = self.dir / "run/munge/munged.pid"
        files = {"key-file": key, "socket": sock, "pid-file": pidfile}
        files.update({"log-file": self.dir / "log/munged.log", "seed-file": self.dir / "run/munge/seed"})
        run("runuser", "-u", "munge", "--", "munged", *(f"--{k}={v}" for k, v in files.items()))
        self._remember("munged", pidfile)
        self.munge_socket = sock

    def _network(self) -> list[str]:
        """A bridge and one network namespace per node, each with its own address (10.200.0.2, .3, ...)."""
        self.made_netns_dir = not Path("/run/netns").exists()
        run("ip", "link", "add", BRIDGE, "type", "bridge")
        run("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
        run("ip", "link", "set", BRIDGE, "up")
        names = []
        for i in range(self.nodes):
            name, host_end = f"node{chr(ord('A') + i)}", f"llmv{i}"
            run("ip", "netns", "add", name)
            self.netns.append(name)
            run("ip", "link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", name)
            run("ip", "link", "set", host_end, "master", BRIDGE)
            run("ip", "link", "set", host_end, "up")
            ns = ("ip", "netns", "exec", name)
            run(*ns, "ip", "addr", "add", f"{SUBNET}.{i + 2}/24", "dev", "eth0")
            run(*ns, "ip", "link", "set", "eth0", "up")
            run(*ns, "ip", "link", "set", "lo", "up")
            names.append(name)
        return names

    def _write_conf(self, names: list[str]) -> None:
        memory = int(re.search(r"RealMemory=(\d+)", run("slurmd", "-C").stdout).group(1))
        cpus = os.cpu_count() or 1
        d = self.dir
        per, mem = max(1, cpus // len(names)), int(memory * 0.9 / len(names))
        # as many pretend GPUs per node as CPUs (up to 4), so that job scripts can ask for --gpus-per-node as on a
        # GPU cluster: Slurm wants a device file per GPU, here harmless ones; the tasks see no CUDA and use the CPU
        gpus = min(per, len(FAKE_GPU_FILES))
        addrs = [""] if self.nodes == 1 else [f" NodeAddr={SUBNET}.{i + 2}" for i in range(len(names))]
        host = "localhost" if self.nodes == 1 else f"localhost({SUBNET}.1)"
        nodes = [
            f"NodeName={n}{a} CPUs={per} RealMemory={mem} Gres=gpu:{gpus} State=UNKNOWN"
            for n, a in zip(names, addrs, strict=True)
        ]
        gres = "".join(f"Name=gpu File={f}\n" for f in FAKE_GPU_FILES[:gpus])
        (self.dir / "gres.conf").write_text("AutoDetect=off\n" + gres)
        conf = f"""ClusterName=llmtest
SlurmctldHost={host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd.%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd.%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
EnforcePartLimits=ALL
GresTypes=gpu
JobRequeue=1
ReturnToService=2
MailProg=/bin/true
KillWait=10
MinJobAge=600
SchedulerParameters=sched_interval=1
{chr(10).join(nodes)}
PartitionName=debug Nodes={",".join(names)} Default=YES MaxTime=INFINITE State=UP
"""
        Path(self.env["SLURM_CONF"]).write_text(conf)

    def _daemon(self, label: str, cmd: list[str], pidfile: Path) -> None:
        run(*cmd, env=self.env)  # daemonises; writes its pid file
        self._remember(label, pidfile)

    def _remember(self, label: str, pidfile: Path) -> None:
        deadline = time.time() + 15
        while time.time() < deadline:
            if pidfile.is_file() and pidfile.read_text().strip():
                self.pids.append((label, int(pidfile.read_text().strip())))
                return
            time.sleep(0.05)
        raise RuntimeError(f"{label} did not start: no pid in {pidfile} (logs in {self.dir / 'log'})")

    def _wait_idle(self, names: list[str], timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            r = run("sinfo", "-h", "-N", "-o", "%N %t", check=False, env=self.env)
            states = dict(line.split() for line in r.stdout.splitlines() if line.strip())
            if r.returncode == 0 and all(states.get(n) == "idle" for n in names):
                return
            time.sleep(0.2)
        raise RuntimeError(f"the nodes did not come up idle: {r.stdout.strip() or r.stderr.strip()}")

    # ---- use ------------------------------------------------------------------------------------------------
    def sbatch(self, *args: str, cwd: str | Path | None = None, env: dict | None = None) -> int:
        """Submit; return the job id."""
        r = run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return int(r.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...)."""
        out = run("scontrol", "-o", "show", "job", str(job_id), env=self.env).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def release(self, job_id: int, after_s: float = 5.0) -> dict[str, str]:
        """Start a requeued job `after_s` seconds after it was requeued, rather than after Slurm's 120 s hold;
        return its fields. (Released at once, the node still holds the old allocation's revoked credential and
        kills the job: "Job credential revoked"; a few seconds are enough.)"""
        info = self.job(job_id)
        if info["JobState"] == "PENDING" and info.get("Reason") == "BeginTime":
            held = self.held_since.setdefault((job_id, info.get("Restarts")), time.time())
            if time.time() - held >= after_s:
                run("scontrol", "update", f"JobId={job_id}", "StartTime=now", env=self.env, check=False)
        return info

    def wait(self, job_id: int, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300):
        """Poll until the job reaches one of `states`; return its fields. Releases requeued jobs at once
        (Slurm holds a requeued job for 120 s)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.release(job_id)
            if info["JobState"] in states:
                return info
            time.sleep(0.25)
        raise TimeoutError(f"job {job_id} still {info['JobState']} after {timeout} s")

    # ---- tear-down ------------------------------------------------------------------------------------------
    def stop(self) -> None:
        if shutil.which("scancel"):
            run("scancel", "--full", "--user=root", check=False, env=self.env)
        for _, pid in reversed(self.pids):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            deadline = time.time() + 10
            while time.time() < deadline and not gone(pid):
                time.sleep(0.05)
            if not gone(pid):
                os.kill(pid, signal.SIGKILL)
        self.pids.clear()
        for i, name in enumerate(self.netns):
            run("ip", "link", "delete", f"llmv{i}", check=False)  # the namespace may outlive its zombies
            run("ip", "netns", "delete", name, check=False)
        if self.netns:
            run("ip", "link", "delete", BRIDGE, check=False)
            if self.made_netns_dir:
                run("umount", "/run/netns", check=False)
                shutil.rmtree("/run/netns", ignore_errors=True)
        self.netns.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(description="Start a local Slurm cluster until Ctrl-C.")
    p.add_argument("--nodes", type=int, default=1)
    a = p.parse_args()
    cluster = Cluster(a.nodes).start()
    print(f"export SLURM_CONF={cluster.env['SLURM_CONF']}", flush=True)
    try:
        signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()
        sys.exit(0)
