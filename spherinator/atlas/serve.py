"""``spherinator atlas serve``: a static file server on 127.0.0.1 for atlas pages (browsers load ES modules,
HiPS tiles and catalogs over HTTP, not from file://), and the SSH line that brings it to a laptop. It serves only
regular files under its directory (a link leading outside answers 404) and lists no directory."""

from __future__ import annotations

import functools
import getpass
import os
import socket
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from spherinator.atlas import AtlasError
from spherinator.atlas.page import SWEEP_PAGE


class _Handler(SimpleHTTPRequestHandler):
    """Static files with the types Aladin Lite needs (ES modules, WASM, VOTables); requests are kept in
    ``server.requests`` and logged only when ``server.verbose``."""

    extensions_map = {
        **SimpleHTTPRequestHandler.extensions_map,
        ".js": "text/javascript",
        ".mjs": "text/javascript",
        ".wasm": "application/wasm",
        ".vot": "application/x-votable+xml",
        ".json": "application/json",
        ".fits": "application/fits",
        "": "text/plain",  # HiPS 'properties'
    }

    def send_head(self):  # noqa: ANN201 (http.server's own signature)
        """Only regular files under the served directory (links followed, then checked), a directory's index.html;
        no listings, nothing a link leads to outside."""
        if self._served() is None:
            self.send_error(HTTPStatus.NOT_FOUND, "File not found")
            return None
        return super().send_head()

    def _served(self) -> Path | None:
        """The file a request names, resolved, if it is a regular file under the served directory."""
        path = Path(self.translate_path(self.path))
        if path.is_dir():
            path = path / "index.html"
        root = Path(self.directory).resolve()
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing, or a loop of links
            return None
        return real if real.is_relative_to(root) and real.is_file() else None

    def list_directory(self, path: str | os.PathLike[str]) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "No listings")
        return None

    def log_message(self, format: str, *args: object) -> None:
        if getattr(self.server, "verbose", False):
            super().log_message(format, *args)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        self.server.requests.append((self.path, int(code) if str(code).isdigit() else 0))  # type: ignore[attr-defined]
        super().log_request(code, size)


def make_server(directory: str | Path, port: int = 8000, host: str = "127.0.0.1",
                verbose: bool = False) -> ThreadingHTTPServer:  # fmt: skip
    """A server of ``directory`` on ``host:port`` (port 0: a free one), not yet serving: call ``serve_forever``.
    ``server.requests`` lists the (path, status) of every request."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AtlasError(f"'{directory}' is no directory; give an atlas directory (or a sweep's) to serve")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise AtlasError(f"--port {port} is not a TCP port: give 1..65535 (0: a free one)")
    handler = functools.partial(_Handler, directory=str(directory))
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except (OSError, OverflowError) as err:
        reason = getattr(err, "strerror", None) or err
        raise AtlasError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from err
    server.daemon_threads = True
    server.verbose = verbose  # type: ignore[attr-defined]
    server.requests = []  # type: ignore[attr-defined]
    return server


def start_page(directory: Path) -> str:
    """The page to open in a served directory: its index.html, else a sweep's atlas.html (else the directory,
    which answers 404: no listings)."""
    for name in ("index.html", SWEEP_PAGE):
        if (directory / name).is_file():
            return name if name != "index.html" else ""
    return ""


def tunnel_line(port: int) -> str:
    """The ``ssh -L`` command that forwards ``localhost:port`` on a laptop to this server (through the login node
    when this runs in a Slurm job on a compute node)."""
    user, host = getpass.getuser(), socket.getfqdn()
    target = f"{user}@{host}"
    if os.environ.get("SLURM_JOB_ID"):
        return f"ssh -N -L {port}:127.0.0.1:{port} -J {user}@<login-node> {target}"
    return f"ssh -N -L {port}:127.0.0.1:{port} {target}"


def serve(directory: str | Path, port: int = 8000, host: str = "127.0.0.1", verbose: bool = True) -> None:
    """Serve ``directory`` until Ctrl-C, after printing its URL and the SSH port-forward line (flushed at once:
    in a Slurm log or under nohup stdout is a file, whose buffer would hold them until the server ends)."""
    directory = Path(directory)
    server = make_server(directory, port, host, verbose)
    port = server.server_address[1]
    page = start_page(directory)
    print(f"spherinator atlas: serving {directory.resolve()} at http://{host}:{port}/{page} (Ctrl-C stops)", flush=True)
    print(f"from your laptop: {tunnel_line(port)}", flush=True)
    print(f"  then open http://localhost:{port}/{page}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
