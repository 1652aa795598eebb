"""What makes `minidepth serve` safe to leave running: which Host headers it answers, who may log in, the options.

  - Host check (DNS rebinding). A web page of another site can make its own name resolve to 127.0.0.1 and then call
    the server from the visitor's browser as if it were "same origin"; the one thing it cannot change is the Host
    header, which carries its name. So a request is answered only when its Host is an address the server was bound
    to: 127.0.0.1 / localhost / [::1] for a loopback --host, the --host itself otherwise (any IP literal, localhost and
    this machine's names for 0.0.0.0 / ::, since a rebinding page always comes by a name), a name given with
    --allowed-host (repeatable: a reverse proxy's or a LAN name), and with --share gradio's *.gradio.live. Anything else
    gets 400 before gradio sees the request (`HostCheck`, a plain ASGI middleware).
  - Passwords: --auth USER:PASS (repeatable; visible in `ps`) or --auth-file FILE (lines USER:PASS, # comments) go to
    gradio's login form. Listening beyond loopback (or --share) without either is warned about.

How the middleware gets in: gradio 6 builds its FastAPI app inside `launch()` and starts serving at once (it calls
itself to check it started), so `demo.app` is only there when Starlette no longer accepts middleware, and
`gr.mount_gradio_app` on an app of our own would lose what `launch()` does (the --share tunnel, the port search, its
start-up messages and checks). `launch(app_kwargs={"middleware": [...]})` is gradio's public way to pass arguments to
the FastAPI app it builds: the check runs before every route of that app; only gradio's own CORS and compression
wrappers, which serve no data, sit outside it. `num_workers=0` keeps gradio's optional static-file worker
processes (which would serve files without this app) off.
"""

from __future__ import annotations

import ipaddress
import socket
from pathlib import Path

from .errors import CLIError

LOOPBACK_NAMES = {"127.0.0.1", "localhost", "::1"}
WILDCARDS = {"0.0.0.0", "::", ""}


def add_options(p) -> None:
    """serve's --analytics, --allowed-host, --auth and --auth-file."""
    p.add_argument("--allowed-host", action="append", metavar="NAME",
                   help="also answer requests for this host name (repeatable), e.g. the name of a reverse proxy; "
                        "others than the bound address get 400 (DNS rebinding)")
    p.add_argument("--auth", action="append", metavar="USER:PASS",
                   help="ask for this user name and password (repeatable; visible to other users of this machine "
                        "in `ps`: prefer --auth-file)")
    p.add_argument("--auth-file", metavar="FILE", help="ask for a user name and password: one USER:PASS per line")
    p.add_argument("--analytics", action="store_true",
                   help="let gradio send its usage statistics (off unless given)")


# ------------------------------------------------------------------------------------------------ hosts
def _bare(host: str) -> str:
    """A Host header or --host value -> the lower-case name or address, without port, brackets or final dot."""
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:7860
        return host[1:host.index("]")] if "]" in host else host
    if host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.rsplit(":", 1)[0]
    return host.rstrip(".")


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    host = _bare(host)
    return host == "localhost" or (_is_ip(host) and ipaddress.ip_address(host).is_loopback)


class AllowedHosts:
    """Which Host headers a server bound to `bound` answers (module docstring); call it with a Host header."""

    def __init__(self, bound: str, extra: list[str] = (), share: bool = False):
        bound = _bare(bound)
        self.names = {_bare(name) for name in extra}
        self.any_ip = bound in WILDCARDS
        if is_loopback(bound) or self.any_ip:
            self.names |= LOOPBACK_NAMES | {bound}
        else:
            self.names.add(bound)
        if self.any_ip:
            self.names |= {_bare(socket.gethostname()), _bare(socket.getfqdn())}
        self.names.discard("")
        self.share = share

    def __call__(self, host_header: str) -> bool:
        host = _bare(host_header)
        if not host:
            return False
        return (host in self.names or (self.any_ip and _is_ip(host))
                or (self.share and host.endswith(".gradio.live")))


class HostCheck:
    """ASGI middleware: a request (HTTP or websocket) whose Host header `allowed` refuses gets 400, and goes no
    further."""

    def __init__(self, app, allowed):
        self.app, self.allowed = app, allowed

    async def __call__(self, scope, receive, send):
        if scope["type"] in ("http", "websocket"):
            host = next((value.decode("latin-1") for key, value in scope["headers"] if key == b"host"), "")
            if not self.allowed(host):
                if scope["type"] == "websocket":
                    await send({"type": "websocket.close", "code": 1008})
                    return
                body = (f"400 Bad Request: this server does not answer for the host {host!r} (it would be a DNS "
                        "rebinding attack from another site; `minidepth serve --allowed-host NAME` allows a name)\n"
                        ).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"text/plain; charset=utf-8"),
                                        (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def host_middleware(args) -> list:
    """launch()'s app_kwargs["middleware"]: the Host check for serve's --host, --allowed-host and --share."""
    from starlette.middleware import Middleware
    return [Middleware(HostCheck, allowed=AllowedHosts(args.host, args.allowed_host or [], args.share))]


# ------------------------------------------------------------------------------------------------ passwords
def _pair(text: str, where: str) -> tuple[str, str]:
    user, colon, password = text.partition(":")
    if not colon or not user.strip() or not password:
        raise CLIError(f"{where}: expected USER:PASS (a user name, a colon, a password)", code=2)
    return user.strip(), password


def read_auth(pairs: list[str] | None, file: str | None) -> list[tuple[str, str]] | None:
    """The (user, password) pairs of --auth and --auth-file for gradio's `auth`; None when there are none. The
    messages never show a password."""
    entries = [_pair(text, "--auth") for text in pairs or []]
    if file:
        try:
            lines = Path(file).read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise CLIError(f"--auth-file {file}: cannot be read ({e})") from e
        for number, line in enumerate(lines, 1):
            if line.strip() and not line.lstrip().startswith("#"):
                entries.append(_pair(line.rstrip("\r\n"), f"--auth-file {file} line {number}"))
        if not entries:
            raise CLIError(f"--auth-file {file} holds no USER:PASS line", code=2)
    return entries or None


def warn_if_open(args, auth, console) -> None:
    """A warning when others can reach the page and nobody is asked for a password."""
    if auth:
        return
    if not is_loopback(args.host):
        console.warn(f"--host {args.host} lets other machines in, and nobody is asked for a password: pass "
                     "--auth-file FILE (lines USER:PASS) or --auth USER:PASS")
    elif args.share:
        console.warn("--share makes the page public on the internet, and nobody is asked for a password: pass "
                     "--auth-file FILE (lines USER:PASS) or --auth USER:PASS")
