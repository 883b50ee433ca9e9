"""A throw-away SLURM cluster on this machine, for tests of the job scripts in `launch/slurm/`.

Why a real cluster: what makes a job script right or wrong is what SLURM does with it (the
allocation's node list and environment, `srun` starting one launcher per node, the exit status that
`sbatch --wait` hands back). Debian ships SLURM and munge as packages, and one host can run a
`slurmctld` with one or two `slurmd` (the second under the node name `localhost`, both on 127.0.0.1),
which gives a real 1- or 2-node allocation within seconds.

Everything the cluster writes lives in a fresh temporary directory (munge key and socket, slurm.conf,
controller state, spool, logs): nothing under /etc is touched and no system service is started. There
is no systemd and no cgroup plugin (processes are tracked with `proctrack/linuxproc`). Every daemon
runs in the foreground as a child of this process and is stopped by its own PID when the cluster is
closed, also when a test fails; every wait has a hard time limit.

    with SlurmCluster(nodes=2) as cluster:
        job = cluster.submit_and_wait("launch/slurm/multi_node.sbatch", ["--nodes=2"], timeout=180)

`SlurmUnavailable` says why a machine cannot host the cluster (not root, no apt-get, the install
failed); tests turn it into a skip, or a failure when the environment asks for SLURM.
"""

from __future__ import annotations

import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "sinfo", "squeue", "scancel")
# Daemons live in sbin, which a non-login shell (or CI) may leave off PATH.
_SEARCH_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/local/sbin", "/usr/sbin", "/sbin"])
# Variables of an enclosing SLURM job (the suite itself may run inside one) would leak into our jobs.
_FOREIGN_ENV_PREFIXES = ("SLURM_", "SBATCH_", "SALLOC_", "SRUN_")

OPT_OUT_ENV = "LITEPPO_SLURM"  # "skip": never install SLURM for the tests (they skip, or fail under CI)
INSTALL_TIMEOUT_S = 240     # apt-get install (and an apt-get update before a retry)
START_TIMEOUT_S = 60        # munged up, then every node idle
STOP_TIMEOUT_S = 15         # per daemon, SIGTERM then SIGKILL


_install_failure: str | None = None     # why the install failed, once it has


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster; the message says why."""


def find_programs() -> dict[str, str | None]:
    """Absolute path of every program the cluster needs (None where missing)."""
    return {name: shutil.which(name, path=_SEARCH_PATH) for name in DAEMONS + CLIENTS}


def _tail(path: str, limit: int = 3000) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()[-limit:]
    except OSError as e:
        return f"<{e}>"


def ensure_slurm(install: bool = True) -> dict[str, str]:
    """The SLURM and munge programs, installed from Debian's packages when missing and allowed.

    Installing needs root and apt-get; it first tries the package lists already on the machine and runs
    `apt-get update` only when that fails. A `policy-rc.d` that forbids starting services is put in place
    for the install when the machine has none, so that the packages' scripts start no system daemons
    (ours run from a temp directory); it is removed again afterwards.
    """
    global _install_failure
    if not sys.platform.startswith("linux"):
        raise SlurmUnavailable(f"the local SLURM cluster needs Linux (this is {sys.platform})")
    programs = find_programs()
    missing = sorted(name for name, path in programs.items() if path is None)
    if not missing:
        return {name: path for name, path in programs.items() if path}
    if _install_failure is not None:    # tried and failed in this process: do not pay the time again
        raise SlurmUnavailable(_install_failure)
    if not install:
        raise SlurmUnavailable(f"SLURM is not installed (missing: {', '.join(missing)})")
    if os.environ.get(OPT_OUT_ENV) == "skip":
        raise SlurmUnavailable(f"SLURM is not installed (missing: {', '.join(missing)}) and {OPT_OUT_ENV}=skip "
                               "asks not to install it")
    if os.geteuid() != 0:
        raise SlurmUnavailable(f"SLURM is not installed (missing: {', '.join(missing)}) and installing it "
                               f"needs root (running as uid {os.geteuid()})")
    apt_get = shutil.which("apt-get", path=_SEARCH_PATH)
    if apt_get is None:
        raise SlurmUnavailable(f"SLURM is not installed (missing: {', '.join(missing)}) and there is no "
                               "apt-get to install it with")
    # Say it before doing it: this changes the machine (system packages), and takes a minute or two.
    print(f"tests/slurm: installing {' '.join(PACKAGES)} with apt-get (as root) for the local SLURM cluster "
          f"tests; set {OPT_OUT_ENV}=skip to skip those tests instead", file=sys.__stderr__, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # Bounded network waits: offline, the install fails in seconds rather than minutes.
    apt_opts = ["-q", "-o", "DPkg::Lock::Timeout=60", "-o", "Acquire::http::Timeout=20",
                "-o", "Acquire::Retries=1"]
    install_cmd = [apt_get, "install", "-y", "--no-install-recommends", *apt_opts, *PACKAGES]
    policy = "/usr/sbin/policy-rc.d"
    own_policy = not os.path.exists(policy)
    deadline = time.monotonic() + INSTALL_TIMEOUT_S
    log = []
    try:
        if own_policy:
            with open(policy, "w", encoding="utf-8") as f:
                f.write("#!/bin/sh\n# written by tests/slurm/cluster.py for one apt-get install\nexit 101\n")
            os.chmod(policy, 0o755)
        for cmd in (install_cmd, [apt_get, "update", *apt_opts], install_cmd):
            left = deadline - time.monotonic()
            if left <= 0:
                log.append("out of time")
                break
            try:
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                log.append(f"{' '.join(cmd)}: timed out")
                break
            log.append(f"{' '.join(cmd)}: exit {proc.returncode}\n{(proc.stdout + proc.stderr)[-1500:]}")
            if cmd is install_cmd and proc.returncode == 0:
                break
    finally:
        if own_policy:
            try:
                os.remove(policy)
            except OSError:
                pass
    programs = find_programs()
    missing = sorted(name for name, path in programs.items() if path is None)
    if missing:
        _install_failure = (f"installing {' '.join(PACKAGES)} with apt-get failed (still missing: "
                            f"{', '.join(missing)}):\n" + "\n".join(log)[-4000:])
        raise SlurmUnavailable(_install_failure)
    return {name: path for name, path in programs.items() if path}


def _free_ports(n: int) -> list[int]:
    """`n` distinct TCP ports free right now (held open together so that none is handed out twice)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _first_job_id() -> int:
    """A random job id whose derived rendezvous port (10000 + id % 20000) is free right now."""
    rng = random.SystemRandom()
    for _ in range(50):
        job_id = rng.randrange(1000, 20000)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", 10000 + job_id % 20000))
            except OSError:
                continue
        return job_id
    return rng.randrange(1000, 20000)


def parse_key_values(text: str) -> dict[str, str]:
    """`Key=Value Key2=Value two ...` (the `scontrol -o` format; a value may hold spaces) as a dict."""
    return {m.group(1): m.group(2).strip()
            for m in re.finditer(r"(?:^|\s)([A-Za-z][\w:/]*)=(.*?)(?=\s+[A-Za-z][\w:/]*=|\s*$)", text.strip())}


@dataclass
class JobResult:
    """What one `sbatch --wait` left behind."""

    job_id: str | None
    returncode: int             # sbatch's own exit status: the job's exit code with --wait
    sbatch_output: str          # sbatch's stdout + stderr
    info: dict[str, str] = field(default_factory=dict)  # `scontrol show job -o`, read right after
    output: str = ""            # the job's output file (--output)

    @property
    def state(self) -> str | None:
        return self.info.get("JobState")


class SlurmCluster:
    """slurmctld plus `nodes` slurmd (1 or 2) and a munged, all from one temp directory.

    Use it as a context manager: leaving the block (normally or by an exception) cancels what is still
    queued or running, stops the daemons by PID, kills any process left from our jobs and deletes the
    directory.
    """

    PARTITION = "test"

    def __init__(self, nodes: int = 1, *, start_timeout: float = START_TIMEOUT_S) -> None:
        if nodes not in (1, 2):
            raise ValueError("the local cluster has 1 or 2 nodes")
        self.nodes = nodes
        self.start_timeout = start_timeout
        self.dir: str | None = None
        self.conf = ""
        self.node_names: list[str] = []
        self.cpus_per_node = 0
        self.real_memory_mb = 0
        self._procs: list[tuple] = []   # (name, Popen, log path), in start order
        self._programs: dict[str, str] = {}

    # -- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> SlurmCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        self._programs = ensure_slurm()
        if os.geteuid() != 0:
            # slurmd starts job steps as the submitting user, which needs root; so does SlurmUser=root.
            raise SlurmUnavailable(f"running slurmctld and slurmd needs root (running as uid {os.geteuid()})")
        # Short path under the system temp dir: the munge socket path must fit a unix socket (108 bytes).
        self.dir = tempfile.mkdtemp(prefix="liteppo-slurm-")
        for sub in ("munge", "state", "spool", "log"):
            os.makedirs(os.path.join(self.dir, sub), mode=0o700)
        deadline = time.monotonic() + self.start_timeout
        self._start_munge(deadline)
        self._write_conf()
        self._spawn("slurmctld", [self._programs["slurmctld"], "-D", "-f", self.conf])
        for name in self.node_names:
            os.makedirs(os.path.join(self.dir, "spool", name), mode=0o755)
            self._spawn(f"slurmd-{name}", [self._programs["slurmd"], "-D", "-N", name, "-f", self.conf])
        self._wait_idle(deadline)

    def stop(self) -> None:
        """Cancel our jobs, stop the daemons (newest first) by PID, sweep leftovers, delete the dir."""
        if self.dir is None:
            return
        ctld = next((p for n, p, _ in self._procs if n == "slurmctld"), None)
        if ctld is not None and ctld.poll() is None:
            self.cancel_all()
        for _name, proc, _ in reversed(self._procs):
            _stop_process(proc)
        self._procs.clear()
        self._kill_leftovers()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None

    def _spawn(self, name: str, cmd: Sequence[str]) -> subprocess.Popen:
        log_path = os.path.join(self.dir, "log", f"{name}.out")
        with open(log_path, "wb") as log:
            # own session: a Ctrl-C in the terminal reaches pytest, which then stops us by PID
            proc = subprocess.Popen(list(cmd), env=self.env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        self._procs.append((name, proc, log_path))
        return proc

    def _start_munge(self, deadline: float) -> None:
        """Our own munged (own key, socket, pid and seed files): SLURM's auth plugins talk to it."""
        d = os.path.join(self.dir, "munge")
        key = os.path.join(d, "munge.key")
        self.munge_socket = os.path.join(d, "munge.socket")
        subprocess.run([self._programs["mungekey"], "--create", f"--keyfile={key}"], check=True,
                       capture_output=True, timeout=30)
        proc = self._spawn("munged", [
            self._programs["munged"], "--foreground", "--force", f"--key-file={key}",
            f"--socket={self.munge_socket}", f"--pid-file={os.path.join(d, 'munged.pid')}",
            f"--log-file={os.path.join(self.dir, 'log', 'munged.log')}",
            f"--seed-file={os.path.join(d, 'munged.seed')}"])
        while not os.path.exists(self.munge_socket):
            if proc.poll() is not None:
                raise RuntimeError(f"munged exited with {proc.returncode}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket in time:\n{self.logs()}")
            time.sleep(0.05)

    def _write_conf(self) -> None:
        """slurm.conf: nodes as `slurmd -C` sees this machine (RealMemory cut by 10% so that it always
        registers), auth through our munged, no accounting, no cgroups, state in the temp dir."""
        probe = subprocess.run([self._programs["slurmd"], "-C"], capture_output=True, text=True, timeout=30,
                               env=self.env)
        line = next((ln for ln in probe.stdout.splitlines() if ln.startswith("NodeName=")), None)
        if probe.returncode != 0 or line is None:
            raise RuntimeError(f"`slurmd -C` failed ({probe.returncode}): {probe.stdout}{probe.stderr}")
        hw = parse_key_values(line)
        host = hw.pop("NodeName")
        self.cpus_per_node = int(hw["CPUs"])
        self.real_memory_mb = int(int(hw["RealMemory"]) * 0.9)
        hw["RealMemory"] = str(self.real_memory_mb)
        hardware = " ".join(f"{k}={v}" for k, v in hw.items() if k != "UpTime")
        # The job scripts use node names as host names (MASTER_ADDR): both must resolve to this machine.
        self.node_names = [host, "localhost"][: self.nodes]
        if host == "localhost" and self.nodes == 2:
            raise SlurmUnavailable("the host is called `localhost`: no second node name for a 2-node cluster")
        for name in self.node_names:
            try:
                socket.gethostbyname(name)
            except OSError as e:
                raise SlurmUnavailable(f"node name {name!r} does not resolve ({e}): jobs could not reach it") from e
        ctld_port, *node_ports = _free_ports(1 + self.nodes)
        d = self.dir
        lines = [
            "# throw-away test cluster (tests/slurm/cluster.py)",
            "ClusterName=liteppotest",
            f"SlurmctldHost={host}(127.0.0.1)",
            f"SlurmctldPort={ctld_port}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            f"StateSaveLocation={d}/state",
            f"SlurmdSpoolDir={d}/spool/%n",
            f"SlurmctldPidFile={d}/slurmctld.pid",
            f"SlurmdPidFile={d}/slurmd.%n.pid",
            f"SlurmctldLogFile={d}/log/slurmctld.log",
            f"SlurmdLogFile={d}/log/slurmd.%n.log",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/builtin",
            "MpiDefault=none",
            # Without it a request the nodes can never satisfy stays PENDING forever instead of failing.
            "EnforcePartLimits=ALL",
            "ReturnToService=2",
            "MailProg=/bin/true",
            "KillWait=5",
            # `sbatch --wait` polls every 2 s, doubling while below MinJobAge/2 (up to 32 s): 4 keeps the poll
            # at 2 s, and a finished job's record stays at least 4 s (until the next purge, every minute)
            # for `scontrol show job` right after sbatch returns.
            "MinJobAge=4",
            # The job scripts derive their rendezvous port from the job id (10000 + id % 20000): a random
            # first id keeps two test clusters on one machine (parallel CI jobs) off each other's ports.
            f"FirstJobId={_first_job_id()}",
        ]
        for name, port in zip(self.node_names, node_ports):
            lines.append(f"NodeName={name} NodeAddr=127.0.0.1 Port={port} {hardware} State=UNKNOWN")
        lines.append(f"PartitionName={self.PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        self.conf = os.path.join(d, "slurm.conf")
        with open(self.conf, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")

    def _wait_idle(self, deadline: float) -> None:
        while True:
            dead = [(n, p.returncode) for n, p, _ in self._procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"SLURM daemon(s) exited while starting: {dead}\n{self.logs()}")
            proc = self.client(["sinfo", "-h", "-N", "-o", "%N %T"], timeout=10, check=False)
            states = dict(ln.split() for ln in proc.stdout.splitlines() if len(ln.split()) == 2)
            if proc.returncode == 0 and all(states.get(n) == "idle" for n in self.node_names):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"nodes not idle after {self.start_timeout:.0f} s: {states or proc.stderr}\n"
                                   f"{self.logs()}")
            time.sleep(0.2)

    def cancel_all(self, timeout: float = 20) -> None:
        """Cancel every job of this cluster and wait (bounded) until none is left."""
        deadline = time.monotonic() + timeout
        try:
            self.client(["scancel", "--user", str(os.geteuid()), "--full"], timeout=10, check=False)
            while time.monotonic() < deadline:
                proc = self.client(["squeue", "-h", "-o", "%i"], timeout=10, check=False)
                if proc.returncode != 0 or not proc.stdout.strip():
                    return
                time.sleep(0.3)
        except subprocess.TimeoutExpired:
            pass

    def _kill_leftovers(self) -> None:
        """SIGKILL any process still carrying this cluster's SLURM_CONF in its environment.

        slurmd hands jobs to `slurmstepd` processes that detach from it, and a cancelled job's processes
        can outlive a stopped slurmd. Everything of ours (daemons, step daemons, job processes) inherits
        the unique path of our slurm.conf, so that path identifies exactly the processes to end.
        """
        marker = f"\0SLURM_CONF={self.conf}\0".encode()
        me = os.getpid()
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == me:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    environ = b"\0" + f.read() + b"\0"
            except OSError:
                continue
            if self.conf and marker in environ:
                try:
                    os.kill(int(entry), signal.SIGKILL)
                except OSError:
                    pass

    # -- using it ------------------------------------------------------------------------------------

    @property
    def env(self) -> dict[str, str]:
        """The environment for client commands and jobs: ours, with SLURM_CONF, without a foreign job's."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(_FOREIGN_ENV_PREFIXES)}
        if self.conf:
            env["SLURM_CONF"] = self.conf
        env["PATH"] = _SEARCH_PATH
        return env

    def client(self, args: Sequence[str], *, timeout: float, check: bool = True, cwd: str | None = None,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        """Run a SLURM client command (`sinfo`, `scontrol`, ...) against this cluster."""
        cmd = [self._programs.get(args[0], args[0]), *args[1:]]
        proc = subprocess.run(cmd, env={**self.env, **(env or {})}, cwd=cwd, capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}: {proc.stdout}{proc.stderr}")
        return proc

    def show_job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (empty when the controller no longer knows the job)."""
        proc = self.client(["scontrol", "-o", "show", "job", str(job_id)], timeout=15, check=False)
        return parse_key_values(proc.stdout) if proc.returncode == 0 else {}

    def submit_and_wait(self, script: str, sbatch_args: Sequence[str] = (), script_args: Sequence[str] = (), *,
                        output: str, timeout: float, cwd: str | None = None,
                        env: dict[str, str] | None = None) -> JobResult:
        """`sbatch --wait` the script (its output to `output`, where `%j` is the job id) and collect the outcome.

        `env` is sbatch's whole environment (default: `self.env`); with `--export=ALL` the job gets it.
        `sbatch --wait` exits with the job's exit code. Past `timeout` the job is cancelled and
        `TimeoutError` raised with what the job had written.
        """
        cmd = [self._programs["sbatch"], "--parsable", "--wait", f"--output={output}", *sbatch_args, script,
               *script_args]
        try:
            proc = subprocess.run(cmd, env=self.env if env is None else env, cwd=cwd, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired as e:
            self.cancel_all()
            job_id = (e.stdout or b"").decode(errors="replace").split(";")[0].strip() if e.stdout else ""
            raise TimeoutError(f"job {job_id} ({script}) still running after {timeout:.0f} s; cancelled.\n"
                               f"sbatch: {e.stdout!r} {e.stderr!r}\njob output:\n"
                               f"{_tail(output.replace('%j', job_id), 6000)}\n{self.logs()}") from None
        first = proc.stdout.strip().splitlines()[:1]
        job_id = first[0].split(";")[0] if first and first[0].split(";")[0].isdigit() else None
        info = self.show_job(job_id) if job_id else {}
        out_path = output.replace("%j", job_id or "")
        return JobResult(job_id=job_id, returncode=proc.returncode, sbatch_output=proc.stdout + proc.stderr,
                         info=info, output=_tail(out_path, 10**7) if os.path.exists(out_path) else "")

    def logs(self) -> str:
        """The end of every daemon's log: for error messages."""
        if self.dir is None:
            return ""
        parts = []
        for name in sorted(os.listdir(os.path.join(self.dir, "log"))):
            parts.append(f"--- {name} ---\n{_tail(os.path.join(self.dir, 'log', name), 1500)}")
        return "\n".join(parts)


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when this process dies, even by SIGKILL (then no `finally`
    runs), so that no daemon outlives a test run that was killed."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop_process(proc: subprocess.Popen, timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM, wait up to `timeout`, then SIGKILL: by the process's own PID only."""
    if proc.poll() is not None:
        return
    try:
        proc.terminate()
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    except OSError:
        pass
