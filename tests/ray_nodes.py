"""Ray nodes started the way a cluster starts them (`ray start ... --block`), for tests that need
a cluster of their own beside the session's `local_ray`.

Each node gets its own ports, worker-port range and (head) temp dir, so it never races
`local_ray` for a port, and `ray.init()` elsewhere never finds it (its address file lives in its
own temp dir, not /tmp/ray). A node is stopped by SIGTERM to its `ray start --block` process,
which shuts down the processes it started; `ray stop` is never used: it kills every Ray process
on the machine, `local_ray`'s included. ``kill_node`` is the crash instead: SIGKILL to the node's
whole process group (raylet, workers), as when a Kubernetes node dies.

A worker node can be started with a disk of its own (``own``): a folder on this machine that the
node, in a mount namespace of its own, sees as ``NODE_ROOT`` inside a fresh, empty /tmp, with an
empty tmpfs over each folder in ``hide`` (the driver's caches, the test session's temporary root).
``node_env`` points the node's temporary folder, home and caches (Hugging Face, XDG, emotions)
into ``NODE_ROOT`` and ``node_command(temp_dir=...)`` its Ray temp folder: it cannot see what the
driver or another node wrote in any of them, as pods that share no disk cannot, while the test
can still read each node's folder (its Ray logs, its caches) from the outside.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

NODE_ROOT = "/tmp/n"  # where a node with a disk of its own sees it: short, Ray's sockets live under it


def free_port() -> int:
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_HANDED_OUT: set[int] = set()  # starts of the port blocks this process gave out


def free_port_range(size: int = 200, start_at: int = 21000) -> tuple[int, int]:
    """A run of ports outside Ray's default worker range (10002-19999) and the kernel's ephemeral
    range (32768+), none of them bound now and none handed out before by this process: a node
    that binds them never races another node, or an outgoing connection, for a port."""
    for start in range(start_at, 32768 - size, size):
        if start in _HANDED_OUT:
            continue
        ports = range(start, start + size)
        with contextlib.ExitStack() as stack:
            try:
                for port in ports:
                    s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
                    s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _HANDED_OUT.add(start)
        return start, start + size - 1
    raise RuntimeError(f"no free range of {size} ports between {start_at} and 32768")


def node_command(
    *,
    head: bool,
    num_cpus: int,
    gcs_port: int | None = None,
    temp_dir: str | None = None,
    object_store_bytes: int = 300_000_000,
    resources: dict[str, float] | None = None,
) -> tuple[list[str], int, int | None]:
    """`ray start --block` for a head or for a worker node joining the head at ``gcs_port``, every
    port from one block of its own (see free_port_range), Ray's temp folder ``temp_dir`` (any
    node; keep it short: Unix socket paths under it are limited to 107 bytes), custom
    ``resources`` if given. Returns (command, the head's GCS port, the head's dashboard port or None)."""
    low, _ = free_port_range(120, start_at=23000)
    ports = iter(range(low, low + 20))
    gcs_port = next(ports) if head else gcs_port
    dashboard_port = low + 19 if head else None
    command = [
        sys.executable,
        "-m",
        "ray.scripts.scripts",
        "start",
        "--block",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        f"--min-worker-port={low + 20}",
        f"--max-worker-port={low + 119}",
        f"--node-manager-port={next(ports)}",
        f"--object-manager-port={next(ports)}",
        f"--dashboard-agent-listen-port={next(ports)}",
        f"--dashboard-agent-grpc-port={next(ports)}",
        f"--runtime-env-agent-port={next(ports)}",
        f"--metrics-export-port={next(ports)}",
        f"--object-store-memory={object_store_bytes}",
        "--disable-usage-stats",
    ]
    if temp_dir is not None:
        command.append(f"--temp-dir={temp_dir}")
    if resources:
        command.append(f"--resources={json.dumps(resources)}")
    if head:
        command += [
            "--head",
            f"--port={gcs_port}",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            f"--ray-client-server-port={next(ports)}",
        ]
    else:
        command += [f"--address=127.0.0.1:{gcs_port}"]
    return command, gcs_port, dashboard_port


def node_env(env: dict, root: str = NODE_ROOT) -> dict:
    """``env`` for a node whose own disk is ``root`` (see start_node): its temporary folder, home
    and caches there, nothing that names a folder of the driver's."""
    env = {k: v for k, v in env.items() if k not in ("RAY_TMPDIR", "EMOTIONS_BUNDLE_CACHE", "EMOTIONS_CRASH_FILE")}
    env.update(
        TMPDIR=f"{root}/tmp",
        HOME=f"{root}/home",
        XDG_CACHE_HOME=f"{root}/cache",
        XDG_CONFIG_HOME=f"{root}/config",
        HF_HOME=f"{root}/hf",
        MPLCONFIGDIR=f"{root}/config/matplotlib",
        EMOTIONS_CACHE=f"{root}/emotions-cache",
    )
    return env


NODE_FOLDERS = ("tmp", "home", "cache", "config/matplotlib", "hf", "emotions-cache", "ray")


def start_node(
    command: list[str],
    env: dict,
    log_path: Path,
    hide: Sequence[str | Path] = (),
    own: Path | None = None,
) -> subprocess.Popen:
    """Start a node in a session of its own. With ``own`` or ``hide``, in a mount namespace of its
    own (tests run as root, so unshare and mount are allowed): with ``own``, /tmp there is a fresh
    tmpfs holding only ``own`` (made here, with NODE_FOLDERS in it), seen as NODE_ROOT, and the
    installation (``installation()``: the checkout and its Python, if under /tmp) where it was; every
    existing folder of ``hide`` outside /tmp is an empty tmpfs. Give such a node ``node_env(env)``
    and its Ray temp folder under NODE_ROOT (``node_command(temp_dir=f"{NODE_ROOT}/ray")``)."""
    hide = list(dict.fromkeys(Path(os.path.realpath(h)) for h in hide))
    steps = []
    if own is not None:
        own = Path(own).resolve()
        for name in (".mnt", *NODE_FOLDERS):
            (own / name).mkdir(parents=True, exist_ok=True)
        mnt = shlex.quote(str(own / ".mnt"))
        inside = f"{mnt}/{shlex.quote(os.path.relpath(NODE_ROOT, '/tmp'))}"  # NODE_ROOT once moved
        # A tmpfs made inside ``own``, ``own`` bound into it, then the tmpfs moved over /tmp: the
        # node's /tmp holds its own folder and nothing of this machine's /tmp.
        steps += [
            f"mount -t tmpfs -o size=256m tmpfs {mnt}",
            f"mkdir -p {inside}",
            f"mount --bind {shlex.quote(str(own))} {inside}",
        ]
        # The installation stays where it is, as the image does on every pod: a checkout (and its
        # venv) under /tmp, as CI clones it, is bound back into the node's fresh /tmp.
        for folder in installation():
            if is_under(folder, Path("/tmp")):
                at = f"{mnt}/{shlex.quote(os.path.relpath(folder, '/tmp'))}"
                steps += [f"mkdir -p {at}", f"mount --bind {shlex.quote(str(folder))} {at}"]
        steps.append(f"mount --move {mnt} /tmp")
        hide = [h for h in hide if not is_under(h, Path("/tmp"))]  # hidden with /tmp
        assert is_under(Path(NODE_ROOT), Path("/tmp"))
    hide = [h for h in hide if h.is_dir() and not any(o != h and is_under(h, o) for o in hide)]  # outermost
    steps += [f"mount -t tmpfs -o size=64m tmpfs {shlex.quote(str(h))}" for h in hide]
    if steps:
        command = [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            " && ".join(steps) + ' && exec "$@"',
            "sh",
            *command,
        ]
    with open(log_path, "w") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True)


def installation() -> list[Path]:
    """The folders a node runs from: this checkout and the Python environment (outermost only)."""
    folders = {Path(os.path.realpath(f)) for f in (Path(__file__).parents[1], sys.prefix, sys.base_prefix)}
    return sorted(f for f in folders if not any(o != f and is_under(f, o) for o in folders))


def is_under(path: Path, folder: Path) -> bool:
    path, folder = Path(os.path.realpath(path)), Path(os.path.realpath(folder))
    return path == folder or folder in path.parents


def stop_node(node: subprocess.Popen) -> None:
    """SIGTERM: `ray start --block` stops the processes it started (GCS, raylet, workers)."""
    if node.poll() is None:
        node.terminate()
        try:
            node.wait(timeout=60)
        except subprocess.TimeoutExpired:
            kill_node(node)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(node.pid, signal.SIGKILL)  # anything of it left behind


def kill_node(node: subprocess.Popen) -> None:
    """The node dies at once, with all its processes: SIGKILL to its process group."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.pid, signal.SIGKILL)
    node.wait(timeout=30)


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 120) -> list[dict]:
    """Block until the cluster at ``address`` has ``count`` alive nodes; returns them."""
    probe = (
        f"import json, time, ray; ray.init(address={address!r}, logging_level='ERROR')\n"
        f"deadline = time.time() + {timeout:f}\n"
        "while True:\n"
        "    alive = [n for n in ray.nodes() if n['Alive']]\n"
        f"    if len(alive) >= {count:d} or time.time() > deadline: break\n"
        "    time.sleep(0.5)\n"
        "print('NODES', json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} for n in alive]))"
    )
    deadline = time.monotonic() + timeout
    while True:
        result = subprocess.run(
            [sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=timeout + 60
        )
        if result.returncode == 0:
            import json

            line = next(x for x in result.stdout.splitlines() if x.startswith("NODES "))
            nodes = json.loads(line[len("NODES ") :])
            if len(nodes) >= count:
                return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the cluster at {address} did not reach {count} nodes:\n"
                f"{result.stdout[-2000:]}\n{result.stderr[-4000:]}"
            )
        time.sleep(1)
