"""A Ray cluster of several nodes on one machine, for tests and benchmarks: each node a `ray start`
with its own temp dir and ports (a head, then nodes that join it), stopped by killing exactly its
processes. `ray stop` would end every Ray of the host, other users' too."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).parent / "ray")
# Every port a node listens on, chosen free, so that no other Ray on this host can collide.
NODE_PORT_FLAGS = ("--node-manager-port", "--object-manager-port", "--runtime-env-agent-port",
                   "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--metrics-export-port")
HEAD_PORT_FLAGS = ("--ray-client-server-port",)


def free_ports(n: int) -> list[int]:
    """n distinct free ports: all sockets stay bound until every port is chosen."""
    with contextlib.ExitStack() as stack:
        sockets = [stack.enter_context(socket.socket()) for _ in range(n)]
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]


def ray_env() -> dict[str, str]:
    """The environment of `ray` commands: token auth (Ray's default; `ray job submit` needs it
    said), and no RAY_ADDRESS of another cluster."""
    env = {**os.environ, "RAY_AUTH_MODE": "token"}
    env.pop("RAY_ADDRESS", None)
    return env


def kill_process_trees(markers: list[str]) -> None:
    """Kill (SIGKILL) the processes whose command line names one of `markers`, and their descendants."""
    rows = [line.split(None, 2) for line in
            subprocess.run(["ps", "-ww", "-eo", "pid,ppid,args"], capture_output=True, text=True).stdout.splitlines()[1:]]
    children: dict[int, list[int]] = {}
    for pid, ppid, *_ in rows:
        children.setdefault(int(ppid), []).append(int(pid))
    todo = [int(pid) for pid, _, *args in rows if args and any(m in args[0] for m in markers)]
    seen: set[int] = set()
    while todo:
        pid = todo.pop()
        if pid not in seen and pid != os.getpid():
            seen.add(pid)
            todo += children.get(pid, [])
    for pid in seen:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@dataclass
class LocalCluster:
    """A head node and nodes joined to it, on this machine. `start` brings them up, `kill` ends
    every process of every node at once (a crash of the whole cluster), `start` again gives a fresh
    cluster (new node ids) on the same ports."""

    head_cpus: int = 2
    nodes: list[dict] = field(default_factory=list)  # per extra node: {"num_cpus": n, "resources": {...}}
    temp_dirs: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.port, self.dashboard_port = free_ports(2)

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def start(self) -> None:
        head = self._new_temp_dir()
        self._ray_start(["--head", "--port", str(self.port), "--dashboard-host", "127.0.0.1", "--dashboard-port",
                         str(self.dashboard_port), "--num-cpus", str(self.head_cpus), "--temp-dir", head],
                        HEAD_PORT_FLAGS)
        for node in self.nodes:
            self._ray_start(["--address", f"127.0.0.1:{self.port}", "--num-cpus", str(node["num_cpus"]),
                             "--resources", json.dumps(node.get("resources", {})), "--temp-dir", self._new_temp_dir()])

    def node_ids(self) -> dict[str, dict]:
        """Alive node id → its resources (asks the cluster from a separate process)."""
        code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
                "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))") % (
            f"127.0.0.1:{self.port}",)
        out = subprocess.run([sys.executable, "-c", code], env=ray_env(), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"listing the cluster's nodes failed: {out.stderr[-2000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    def kill(self) -> None:
        kill_process_trees(self.temp_dirs + [f":{self.port}"])

    def _new_temp_dir(self) -> str:
        path = tempfile.mkdtemp(prefix="clpipe-ray-", dir="/tmp")  # short: Ray's socket paths have a length limit
        self.temp_dirs.append(path)
        return path

    def _ray_start(self, args: list[str], extra_flags: tuple[str, ...] = ()) -> None:
        flags = NODE_PORT_FLAGS + extra_flags
        ports = [x for flag, p in zip(flags, free_ports(len(flags))) for x in (flag, str(p))]
        start = subprocess.run([RAY, "start", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", *args, *ports],
                               env=ray_env(), capture_output=True, text=True, timeout=180)
        if start.returncode != 0:
            raise RuntimeError(f"ray start {' '.join(args)} failed:\n{start.stdout[-2000:]}{start.stderr[-2000:]}")
