"""Helpers for the HTTP streaming tests: a uvicorn server in a thread, nginx in front of it.

Everything binds to 127.0.0.1 only, every wait has a deadline, and every server is stopped
by the fixture that started it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import uvicorn

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_PATH = REPO_ROOT / "examples" / "fastapi_stream.py"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")


def load_example() -> ModuleType:
    """Import ``examples/fastapi_stream.py`` (examples/ is not a package)."""
    name = "safecallbacks_example_fastapi_stream"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLE_PATH)
    assert spec is not None and spec.loader is not None, EXAMPLE_PATH
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def free_port() -> int:
    """A TCP port that was free on the loopback interface a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def port_accepts(port: int, host: str = LOOPBACK) -> bool:
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
        return True
    return False


def wait_until(
    predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02, what: str
) -> None:
    """Poll ``predicate`` until it is true; fail with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


# --------------------------------------------------------------------------------------------
# uvicorn
# --------------------------------------------------------------------------------------------


@dataclass
class UvicornThread:
    server: uvicorn.Server
    thread: threading.Thread
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"


@contextlib.contextmanager
def run_uvicorn(app: Any, *, start_timeout: float = 10.0) -> Iterator[UvicornThread]:
    """Serve ``app`` with a real uvicorn on a free loopback port, in a daemon thread.

    The listening socket is bound here and handed to uvicorn, so there is no window in
    which another process could take the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((LOOPBACK, 0))
    port: int = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host=LOOPBACK,
        port=port,
        log_level="warning",
        lifespan="off",
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name=f"uvicorn-{port}", daemon=True
    )
    thread.start()
    try:
        wait_until(
            lambda: (server.started and port_accepts(port)) or not thread.is_alive(),
            timeout=start_timeout,
            what=f"uvicorn on {LOOPBACK}:{port}",
        )
        if not thread.is_alive():
            raise RuntimeError("uvicorn thread exited during startup")
        yield UvicornThread(server=server, thread=thread, port=port)
    finally:
        server.should_exit = True
        thread.join(timeout=10.0)
        if thread.is_alive():
            server.force_exit = True
            thread.join(timeout=5.0)
        sock.close()


# --------------------------------------------------------------------------------------------
# nginx
# --------------------------------------------------------------------------------------------


def find_nginx() -> str | None:
    for candidate in NGINX_CANDIDATES:
        if os.access(candidate, os.X_OK):
            return candidate
    return shutil.which("nginx")


NGINX_CONF = """\
daemon off;
master_process off;
worker_processes 1;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log info;

events {{
    worker_connections 64;
}}

http {{
    access_log {prefix}/access.log;
    client_body_temp_path {prefix}/tmp/client_body;
    proxy_temp_path {prefix}/tmp/proxy;
    fastcgi_temp_path {prefix}/tmp/fastcgi;
    uwsgi_temp_path {prefix}/tmp/uwsgi;
    scgi_temp_path {prefix}/tmp/scgi;

    server {{
        listen {host}:{port};
        location / {{
            proxy_pass http://{host}:{upstream_port};
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_connect_timeout 2s;
            proxy_read_timeout {read_timeout};
            proxy_send_timeout 5s;
        }}
    }}
}}
"""


@dataclass
class NginxProcess:
    process: subprocess.Popen[bytes]
    prefix: Path
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def error_log(self) -> str:
        path = self.prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""


def _stop_process(process: subprocess.Popen[bytes], *, timeout: float = 5.0) -> None:
    if process.poll() is not None:
        return
    # SIGQUIT is nginx's graceful shutdown; SIGTERM its fast one; SIGKILL if both hang.
    for sig in (signal.SIGQUIT, signal.SIGTERM):
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(sig)
        try:
            process.wait(timeout=timeout)
            return
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait(timeout=timeout)


@contextlib.contextmanager
def run_nginx(
    nginx: str,
    upstream_port: int,
    *,
    read_timeout: str = "1s",
    start_timeout: float = 10.0,
    attempts: int = 3,
) -> Iterator[NginxProcess]:
    """Run nginx in the foreground with a private prefix, proxying to ``upstream_port``."""
    with tempfile.TemporaryDirectory(prefix="safecallbacks-nginx-") as tmp:
        prefix = Path(tmp)
        (prefix / "tmp").mkdir()
        last_error = ""
        for _ in range(attempts):
            port = free_port()
            conf = prefix / "nginx.conf"
            conf.write_text(
                NGINX_CONF.format(
                    prefix=prefix,
                    host=LOOPBACK,
                    port=port,
                    upstream_port=upstream_port,
                    read_timeout=read_timeout,
                )
            )
            stderr_path = prefix / "stderr.log"
            with stderr_path.open("wb") as stderr:
                process = subprocess.Popen(
                    # -e comes first: nginx opens its error log before reading the config,
                    # and the packaged default under /var/log may not be writable.
                    [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=stderr,
                )

            def up(port: int = port, process: subprocess.Popen[bytes] = process) -> bool:
                return port_accepts(port) or process.poll() is not None

            try:
                wait_until(up, timeout=start_timeout, what=f"nginx on {LOOPBACK}:{port}")
            except BaseException:
                _stop_process(process)
                raise
            if process.poll() is None:
                break
            # Most likely another process took the port after free_port() picked it: retry.
            last_error = stderr_path.read_text(errors="replace")
            error_log = prefix / "error.log"
            if error_log.exists():
                last_error += error_log.read_text(errors="replace")
        else:
            raise RuntimeError(f"nginx failed to start after {attempts} attempts:\n{last_error}")

        try:
            yield NginxProcess(process=process, prefix=prefix, port=port)
        finally:
            _stop_process(process)
