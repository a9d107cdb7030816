"""``segloop triton serve``: run a real ``tritonserver`` on a model repository.

Uses ``tritonserver`` from PATH when there is one (the official container), else the
binary bundled in the ``nvidia-pytriton`` wheel, which needs three things set up: the
python-backend stub copied next to the backend, this interpreter's ``bin/`` first on PATH
(the stub runs ``python3`` from PATH) and libpython's folder on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from segloop.assets import model_repository
from segloop.errors import UserError


@dataclass
class ServerOptions:
    model_repository: Path = field(default_factory=model_repository)
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    explicit: bool = False  # --model-control-mode=explicit, loading `load` at start
    load: list[str] = field(default_factory=lambda: ["segloop"])
    log_verbose: int = 0
    #: address HTTP, gRPC and metrics bind to: loopback unless asked (``--host``)
    host: str = "127.0.0.1"
    #: ``--model-config-name`` (e.g. "gpu": each model's ``configs/gpu.pbtxt``)
    config_name: str | None = None


def _bundled() -> tuple[Path, Path, dict[str, str]]:
    """(binary, backend dir, extra env) of the tritonserver inside nvidia-pytriton."""
    # locate the package without importing it (its __init__ pulls in client-only deps)
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise UserError(
            "no tritonserver found: none on PATH and nvidia-pytriton is not installed; "
            "run `make install` (it installs nvidia-pytriton) or use the Triton container"
        )
    root = Path(next(iter(spec.submodule_search_locations))) / "tritonserver"
    binary, backends = root / "bin" / "tritonserver", root / "backends"
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = backends / "python" / "triton_python_backend_stub"
    bundled_stub = root / "python_backend_stubs" / py / "triton_python_backend_stub"
    if not stub.exists():
        if not bundled_stub.exists():
            raise UserError(f"nvidia-pytriton has no python backend stub for Python {py}")
        shutil.copy2(bundled_stub, stub)
    libdir = sysconfig.get_config_var("LIBDIR") or ""
    env = {
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "LD_LIBRARY_PATH": os.pathsep.join(
            p for p in (libdir, os.environ.get("LD_LIBRARY_PATH")) if p
        ),
    }
    return binary, backends, env


def find_server() -> tuple[list[str], dict[str, str]]:
    """Command prefix and environment for the tritonserver to run."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return [on_path], {}
    binary, backends, env = _bundled()
    return [str(binary), f"--backend-directory={backends}"], env


def _check_port_free(port: int, flag: str, host: str = "127.0.0.1") -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
        try:
            s.bind((host, port))
        except OSError as exc:
            raise UserError(f"port {port} is already in use; choose another with {flag}") from exc


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TritonServer:
    """A running tritonserver child process (context manager: start → ready → stop)."""

    def __init__(self, opts: ServerOptions, log: Path | None = None) -> None:
        """``log``: file for the server's output (default: this process's stderr)."""
        self.opts = opts
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"{self.client_host}:{self.opts.grpc_port}"

    @property
    def client_host(self) -> str:
        """Where a client on this machine reaches the server (loopback for a wildcard)."""
        host = self.opts.host
        if host in ("0.0.0.0", "::", ""):
            return "127.0.0.1"
        return f"[{host}]" if ":" in host else host

    def command(self) -> tuple[list[str], dict[str, str]]:
        o = self.opts
        repo = o.model_repository.resolve()
        if not (repo.is_dir() and any(repo.glob("*/config.pbtxt"))):
            raise UserError(
                f"{o.model_repository} is not a Triton model repository "
                "(no <model>/config.pbtxt inside)"
            )
        prefix, env = find_server()
        cmd = [
            *prefix,
            f"--model-repository={repo}",
            f"--http-address={o.host}",
            f"--http-port={o.http_port}",
            f"--grpc-address={o.host}",
            f"--grpc-port={o.grpc_port}",
            f"--metrics-address={o.host}",
            f"--metrics-port={o.metrics_port}",
            "--allow-metrics=true",
            f"--log-verbose={o.log_verbose}",
            # liveness before the models load; readiness (polled below) after
            "--strict-readiness=true",
            "--exit-on-error=true",
        ]
        if o.explicit:
            cmd += ["--model-control-mode=explicit", *(f"--load-model={m}" for m in o.load)]
        if o.config_name:
            cmd.append(f"--model-config-name={o.config_name}")
        return cmd, env

    def start(self, timeout: float = 180.0) -> TritonServer:
        for port, flag in (
            (self.opts.http_port, "--http-port"),
            (self.opts.grpc_port, "--grpc-port"),
            (self.opts.metrics_port, "--metrics-port"),
        ):
            _check_port_free(port, flag, self.opts.host or "0.0.0.0")
        cmd, extra = self.command()
        env = {**os.environ, **extra}
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # no busy-waiting ORT/numba pools
        out = self.log.open("ab") if self.log else None
        try:
            self.proc = subprocess.Popen(
                cmd,
                env=env,
                start_new_session=True,
                stdout=out,
                stderr=subprocess.STDOUT if out else None,
            )
        finally:
            if out:
                out.close()
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        url = f"http://{self.client_host}:{self.opts.http_port}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise UserError(
                    f"tritonserver exited with code {self.proc.returncode} while "
                    "starting; its log above says why"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.2)
        self.stop()
        raise UserError(f"tritonserver was not ready after {timeout:.0f} s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait (SIGKILL after ``timeout``); returns the exit code."""
        if self.proc is None or self.proc.poll() is not None:
            return 0 if self.proc is None else self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(opts: ServerOptions, log=print) -> int:
    """Run until SIGINT/SIGTERM, forward the signal, return tritonserver's exit code."""
    server = TritonServer(opts)
    received: list[int] = []

    def forward(signum, _frame) -> None:
        received.append(signum)
        if server.proc is not None and server.proc.poll() is None:
            server.proc.send_signal(signum)

    old = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.start()
        host = opts.host
        log(
            f"tritonserver ready on {host}: gRPC {host}:{opts.grpc_port}, HTTP "
            f"{host}:{opts.http_port}, metrics http://{host}:{opts.metrics_port}/metrics"
            + (
                " (loopback only; --host 0.0.0.0 to listen on every interface)"
                if host == "127.0.0.1"
                else ""
            )
        )
        code = server.proc.wait()
        if received and code in (0, -signal.SIGTERM, -signal.SIGINT):
            return 0
        if code:
            raise UserError(f"tritonserver exited with code {code}")
        return 0
    finally:
        server.stop()
        for s, h in old.items():
            signal.signal(s, h)


def load_version(url: str, model: str, version: int, timeout: float = 120.0) -> None:
    """Ask a Triton server in explicit model-control mode to (re)load ``model`` and wait
    until ``version`` is ready (the version policy decides what else stays loaded)."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        client.load_model(model)
        deadline = time.monotonic() + timeout
        while not client.is_model_ready(model, str(version)):
            if time.monotonic() > deadline:
                raise UserError(f"{url}: {model} version {version} did not become ready")
            time.sleep(0.2)
    except InferenceServerException as exc:
        raise UserError(
            f"{url}: could not load {model} v{version} ({exc.message()}); is the server "
            "running with --model-control-mode explicit?"
        ) from None
    finally:
        client.close()
