"""The local Prefect stack: a server on SQLite bound to 127.0.0.1, a process worker, the deployments.

`python -m flows.stack up` is idempotent: a healthy server or a live worker found through its pid
file is kept, the work pool is created only when missing, and `prefect deploy --all` re-registers
the deployments of `prefect.yaml` (an update when they exist); schedules a user paused or resumed
keep that state (matched by their `slug`). `python -m flows.stack down` stops
what `up` started, by the pids it recorded. State lives in PREFECT_HOME (default `<repo>/.prefect`):
the SQLite database, `server.log`, `worker.log` and the pid files.

The test suite uses the same class with a temporary home and a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POOL = "jurassiclass-process"
DEFAULT_PORT = 4200


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still answers kill(0); it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class Stack:
    home: Path = field(default_factory=lambda: Path(os.environ.get("PREFECT_HOME") or REPO_ROOT / ".prefect"))
    port: int = DEFAULT_PORT
    pool: str = DEFAULT_POOL
    root: Path = REPO_ROOT
    prefect_file: Path | None = None
    # Seconds between the worker's polls; 1 makes `deployment run --watch` start at once.
    worker_query_seconds: float = 2.0
    extra_env: dict[str, str] = field(default_factory=dict)
    restored: list[str] = field(default_factory=list)  # schedule states `up` put back after deploying

    def __post_init__(self) -> None:
        self.home = Path(self.home).resolve()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        """Environment for every process of the stack (server, worker, CLI calls, flow runs)."""
        env = dict(os.environ)
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_API_URL=self.api_url,
            PREFECT_SERVER_API_HOST="127.0.0.1",
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            # Stream flow-run logs to `prefect deployment run --watch` (off by default in Prefect 3.8),
            # so a failed stage's message shows where the user is looking.
            PREFECT_SERVER_LOGS_STREAM_OUT_ENABLED="true",
            PREFECT_SERVER_LOGS_STREAM_PUBLISHING_ENABLED="true",
            PREFECT_WORKER_QUERY_SECONDS=str(self.worker_query_seconds),
            PREFECT_CLI_COLORS="false",
            DO_NOT_TRACK="1",
        )
        env.update(self.extra_env)
        return env

    def _prefect(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess:
        cmd = [str(Path(sys.executable).with_name("prefect")), *args]
        if not Path(cmd[0]).exists():
            cmd = [sys.executable, "-m", "prefect", *args]
        proc = subprocess.run(cmd, cwd=self.root, env=self.env(), capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"`prefect {' '.join(args)}` failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    # ------------------------------------------------------------ pid files

    def _pid_file(self, name: str) -> Path:
        return self.home / f"{name}.pid"

    def pid(self, name: str) -> int | None:
        """The recorded pid of `server` or `worker` if that process is still running."""
        try:
            pid = int(self._pid_file(name).read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def _spawn(self, name: str, args: list[str]) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / f"{name}.log", "ab")
        cmd = [str(Path(sys.executable).with_name("prefect")), *args]
        # A new session: the process gets default signal dispositions (a shell `&` would make it
        # ignore SIGINT/SIGTERM) and `down` can stop its whole process group.
        proc = subprocess.Popen(
            cmd, cwd=self.root, env=self.env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
        log.close()
        self._pid_file(name).write_text(str(proc.pid))
        return proc.pid

    # ------------------------------------------------------------ server

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def start_server(self, timeout: float = 120) -> None:
        if self.healthy():
            return
        if self.pid("server") is None:
            self._spawn("server", ["server", "start", "--host", "127.0.0.1", "--port", str(self.port)])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self.pid("server") is None:
                raise RuntimeError(f"Prefect server exited at start; see {self.home / 'server.log'}:\n{self._tail('server')}")
            time.sleep(0.5)
        raise RuntimeError(f"Prefect server not healthy after {timeout:.0f} s; see {self.home / 'server.log'}")

    def _tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join((self.home / f"{name}.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # ------------------------------------------------------------ pool, worker, deployments

    def ensure_pool(self) -> None:
        if self._prefect("work-pool", "inspect", self.pool, check=False).returncode != 0:
            self._prefect("work-pool", "create", self.pool, "--type", "process")

    def start_worker(self) -> None:
        if self.pid("worker") is not None:
            return
        self._spawn("worker", ["worker", "start", "--pool", self.pool, "--type", "process", "--name", f"{self.pool}-local"])

    def deploy(self) -> str:
        args = ["deploy", "--all", "--no-prompt"]
        if self.prefect_file is not None:
            args += ["--prefect-file", str(self.prefect_file)]
        return self._prefect(*args).stdout

    def schedule_states(self) -> dict[tuple[str, str], bool]:
        """(flow/deployment, schedule slug) -> active, for every deployment schedule on the server."""
        from prefect.client.orchestration import SyncPrefectClient

        states: dict[tuple[str, str], bool] = {}
        with SyncPrefectClient(api=self.api_url) as client:
            flows = {}
            for dep in client.read_deployments():
                if dep.flow_id not in flows:
                    flows[dep.flow_id] = client.read_flow(dep.flow_id).name
                for sch in dep.schedules:
                    if sch.slug:
                        states[(f"{flows[dep.flow_id]}/{dep.name}", sch.slug)] = sch.active
        return states

    def restore_schedules(self, before: dict[tuple[str, str], bool]) -> list[str]:
        """Put back the active/paused state users gave schedules (`prefect deploy` resets it to
        the YAML's); returns what was restored."""
        from prefect.client.orchestration import SyncPrefectClient

        restored = []
        with SyncPrefectClient(api=self.api_url) as client:
            for (name, slug), active in before.items():
                try:
                    dep = client.read_deployment_by_name(name)
                except Exception:  # the deployment left prefect.yaml: nothing to restore
                    continue
                for sch in dep.schedules:
                    if sch.slug == slug and sch.active != active:
                        client.update_deployment_schedule(dep.id, sch.id, active=active)
                        restored.append(f"{name} [{slug}] {'active' if active else 'paused'}")
        return restored

    def up(self) -> None:
        self.start_server()
        self.ensure_pool()
        self.start_worker()
        # A schedule the user resumed or paused stays so: `prefect deploy` would reset it to the YAML's state.
        before = self.schedule_states()
        self.deploy()
        self.restored = self.restore_schedules(before)
        if self.pid("worker") is None:
            raise RuntimeError(f"Prefect worker exited; see {self.home / 'worker.log'}:\n{self._tail('worker')}")

    # ------------------------------------------------------------ stop

    def stop(self, name: str, timeout: float = 20) -> bool:
        """Stop a recorded process group (SIGTERM, then SIGKILL); True if something was running."""
        pid = self.pid(name)
        self._pid_file(name).unlink(missing_ok=True)
        if pid is None:
            return False
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return True

    def down(self) -> None:
        # Worker first, so it does not log connection errors against a stopping server.
        self.stop("worker")
        self.stop("server")


def wait_for_triggered(stack: Stack, deployment: str, since: float, *, appear_s: float = 45, timeout: float = 3600) -> int:
    """Follow the run of ``deployment`` that a trigger started after ``since`` (epoch seconds):
    print its progress and end state; 0 when it completed or none was started."""
    from datetime import datetime, timezone

    from prefect.client.orchestration import SyncPrefectClient
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
    from prefect.client.schemas.sorting import FlowRunSort

    start = datetime.fromtimestamp(since, timezone.utc)
    deadline = time.monotonic() + appear_s
    with SyncPrefectClient(api=stack.api_url) as client:
        dep = client.read_deployment_by_name(deployment)
        run, last = None, None
        while run is None:
            runs = client.read_flow_runs(deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])),
                                         sort=FlowRunSort.EXPECTED_START_TIME_DESC, limit=5)
            run = next((r for r in runs if r.created and r.created >= start), None)
            if run is None:
                if time.monotonic() > deadline:
                    print(f"{deployment}: no run was triggered (the dataset did not change)")
                    return 0
                time.sleep(2)
        print(f"{deployment}: run {run.name!r} started by the dataset's published event; following it (Ctrl-C stops "
              f"following, not the run)")
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            run = client.read_flow_run(run.id)
            if run.state_name != last:
                last = run.state_name
                print(f"{deployment} {run.name}: {last}", flush=True)
            if run.state and run.state.is_final():
                return 0 if run.state.is_completed() else 1
            time.sleep(3)
    print(f"{deployment}: still running after {timeout:.0f} s; see the UI")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "status"
    stack = Stack(port=int(os.environ.get("JURASSICLASS_PREFECT_PORT", DEFAULT_PORT)))
    if cmd == "up":
        stack.up()
        print(f"Prefect UI and API: http://127.0.0.1:{stack.port} (home {stack.home})")
        print(f"worker on pool {stack.pool!r} (log {stack.home / 'worker.log'}); deployments registered:")
        for line in stack.restored:
            print(f"kept your schedule state: {line}")
        print(stack._prefect("deployment", "ls").stdout)
        return 0
    if cmd == "down":
        stack.down()
        print("local Prefect stack stopped")
        return 0
    if cmd == "wait" and len(argv) >= 3:
        return wait_for_triggered(stack, argv[1], float(argv[2]))
    if cmd == "status":
        print(f"server: {'healthy' if stack.healthy() else 'down'} at {stack.api_url}")
        print(f"worker: {'running, pid %d' % stack.pid('worker') if stack.pid('worker') else 'not running'}")
        return 0
    print("usage: python -m flows.stack up|down|status|wait DEPLOYMENT SINCE_EPOCH", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
