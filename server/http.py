"""HTTP hygiene for the gateway: bounded, timed, strictly decoded request bodies, auth, stream
keys and error responses that never carry Python exception text.

Owns: reading a body (size cap, read timeout, UTF-8 only, charset parameter checked),
parsing JSON (depth and size capped), the Bearer-token check (constant-time, scheme matched
case-insensitively) and a stream's watch token (WHEP only), the same-origin rule for the control
routes of a server without a token and its Host rule (DNS rebinding; a proxy's forwarded host
too), the stream-key rule, CORS on every response, console text without control characters,
and quiet, token-free logging of requests (the access log, and those aiohttp cannot parse).
Every refusal here is an aiohttp HTTP exception (a 4xx response), never a logged crash.
Does not own: routes or what a body means (server.app), sessions (server.sessions).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import re

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

CORS = {
    "Access-Control-Allow-Origin": "*",
    "Access-Control-Allow-Methods": "GET, HEAD, POST, DELETE, PATCH, OPTIONS",
    "Access-Control-Allow-Headers": "Authorization, Content-Type, If-Match",
    "Access-Control-Expose-Headers": "Location, Retry-After, X-Session-Id, X-StreamDiff-Expect",
}
ENGINE_KEY = web.AppKey("engine", object)  # the AsyncEngine
SESSIONS_KEY = web.AppKey("sessions", object)  # the SessionManager
SETTINGS_KEY = web.AppKey("settings", object)  # the ServerSettings
MAX_BODY_BYTES = 128 * 1024  # an SDP offer is a few kB; a JSON control message far less
MAX_JSON_DEPTH = 16
STREAM_KEY = re.compile(r"[A-Za-z0-9_-]{1,64}")
UTF8_NAMES = {"utf-8", "utf8", "us-ascii", "ascii"}

log = logging.getLogger(__name__)


def error(status: int, text: str, **headers) -> web.Response:
    return web.Response(status=status, text=text + "\n", headers={**CORS, **headers})


def _raise(cls: type[web.HTTPException], text: str) -> None:
    raise cls(text=text + "\n", headers=CORS)


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def printable(text: str) -> str:
    """`text` as a console line or a reply may show it: control characters (newlines, ANSI escapes
    that would recolour or retitle the operator's terminal) escaped, and lone surrogates (a header's
    bytes that are not UTF-8, as aiohttp decodes them: a probe's Host of 0xff 0xfe made every reply
    quoting it fail to encode, a 500 and a traceback on the console per request)."""
    return _CONTROL.sub(lambda m: ascii(m.group())[1:-1], text)


def shown_key(key: str) -> str:
    """A stream key as a log line may show it: a key that breaks the rule (a newline would start
    a forged line) is shown escaped and cut short."""
    return key if STREAM_KEY.fullmatch(key) else ascii(key[:32]) + ("…" if len(key) > 32 else "")


def check_stream_key(key: str) -> str:
    """Stream keys are 1-64 letters, digits, '-' and '_' (checked before anything is made)."""
    if not STREAM_KEY.fullmatch(key):
        _raise(web.HTTPBadRequest, "a stream key is 1-64 characters: letters, digits, '-' and '_'")
    return key


async def read_text(request: web.Request, timeout_s: float, limit: int = MAX_BODY_BYTES) -> str:
    """The body as text: at most `limit` bytes, read within `timeout_s`, UTF-8 only."""
    charset = (request.charset or "utf-8").lower()
    if charset not in UTF8_NAMES:
        _raise(web.HTTPUnsupportedMediaType, f"charset {charset[:40]!r} is not supported: send UTF-8")
    if request.content_length is not None and request.content_length > limit:
        _too_large(limit, request.content_length)
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            while chunk := await request.content.read(16384):
                size += len(chunk)
                if size > limit:
                    _too_large(limit, size)
                chunks.append(chunk)
    except TimeoutError:
        _raise(web.HTTPRequestTimeout, f"the body did not arrive within {timeout_s:g} s")
    except ConnectionResetError:  # the client left half way through its body (aiohttp: "Connection lost")
        log.debug("%s %s: the client left while it sent its body", request.method, request.path)
        _raise(web.HTTPBadRequest, "the client left while it sent its body")  # reaches nobody; logged as no refusal
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError:
        _raise(web.HTTPBadRequest, "the body is not valid UTF-8")


async def expect_small_body(request: web.Request) -> None:
    """The routes' `Expect: 100-continue` handler: a body declared over MAX_BODY_BYTES is refused
    (413) before the client sends it, instead of after "100 Continue"."""
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        _too_large(MAX_BODY_BYTES, request.content_length)
    expect = request.headers.get("Expect", "")
    if expect.lower() != "100-continue":
        _raise(web.HTTPExpectationFailed, f"Expect: {expect[:40]!r} is not supported (only 100-continue)")
    if request.version >= (1, 1):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # the body's answer starts after it


def _too_large(limit: int, size: int) -> None:
    raise web.HTTPRequestEntityTooLarge(max_size=limit, actual_size=size, headers=CORS,
                                        text=f"the body is larger than {limit} bytes\n")


def _depth_ok(value: object, limit: int) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            if depth > limit:
                return False
            children = node.values() if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)
    return True


def parse_json(text: str) -> object:
    """JSON with at most MAX_JSON_DEPTH levels; ValueError with a plain message otherwise."""
    if text.count("[") + text.count("{") > 10_000:  # cheap guard before the recursive parser
        raise ValueError("the JSON is nested too deeply")
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError("the JSON is nested too deeply") from None
    except ValueError as exc:
        if "integer string conversion" in str(exc):  # valid JSON, over Python's 4300-digit limit
            raise ValueError("a number in the JSON has more digits than any value takes") from None
        raise ValueError("the body is not valid JSON") from None
    if not _depth_ok(value, MAX_JSON_DEPTH):
        raise ValueError(f"the JSON is nested more than {MAX_JSON_DEPTH} levels deep")
    return value


async def read_json_object(request: web.Request, timeout_s: float) -> dict:
    """A JSON object body. A refusal (400, 408, 413, 415) is JSON too, `{"error": "..."}`, as
    every other answer of a JSON endpoint is (a client reads one format)."""
    try:
        if request.content_type != "application/json":
            _raise(web.HTTPUnsupportedMediaType, f"Content-Type must be application/json, not "
                                                 f"{request.content_type[:60]!r}")
        try:
            # a byte-order mark (a file saved by a Windows editor, sent with curl -d @file.json):
            # RFC 8259 lets a parser ignore it, and Python's json refuses it
            value = parse_json((await read_text(request, timeout_s)).removeprefix("\ufeff"))
        except ValueError as exc:
            _raise(web.HTTPBadRequest, str(exc))
        if not isinstance(value, dict):
            _raise(web.HTTPBadRequest, "the body must be a JSON object")
    except web.HTTPException as exc:
        message = exc.text.strip()
        exc.content_type = "application/json"
        exc.text = json.dumps({"error": message}) + "\n"
        raise
    return value


def _presented(request: web.Request) -> list[bytes]:
    """The tokens a request carries: `Authorization: Bearer T` (scheme in any case), `?token=T`.
    surrogateescape: a header byte that is not UTF-8 arrives as a lone surrogate, which .encode()
    refused with a UnicodeEncodeError (a 500 and a traceback for one bad byte, a security probe)."""
    given = []
    scheme, _, bearer = request.headers.get("Authorization", "").strip().partition(" ")
    if scheme.lower() == "bearer":
        given.append(bearer.strip().encode("utf-8", "surrogateescape"))
    if (query := request.query.get("token")) is not None:
        given.append(query.encode("utf-8", "surrogateescape"))
    return given


def authorized(request: web.Request, token: str | None) -> bool:
    """The request carries the server's token (compared in constant time); any request when
    the server has none."""
    return not token or any(hmac.compare_digest(g, token.encode()) for g in _presented(request))


def watch_token(token: str, key: str) -> str:
    """A token that plays stream `key` over WHEP and does nothing else, derived from the server's
    token: a viewer link can carry it without giving its holders control of every stream (a
    security probe: the viewer URL's token let anyone change, end or replace any stream)."""
    return hmac.new(token.encode(), f"watch:{key}".encode(), "sha256").hexdigest()[:32]


def authorized_to_watch(request: web.Request, token: str | None, key: str) -> bool:
    """The server's token, or the watch token of stream `key`."""
    if authorized(request, token):
        return True
    expected = watch_token(token, key).encode()
    return any(hmac.compare_digest(g, expected) for g in _presented(request))


# Routes that control the server or a stream, or open one with the page's own offer. WHIP and
# WHEP stay open to other origins (a browser-based publisher or player on its own site).
CONTROL_PATHS = re.compile(r"/(offer|ws|sessions(/[^/]+(/params)?)?)")
CONTROL_JSON = re.compile(r"/(offer|sessions/[^/]+/params)")  # the ones that answer {"error": ...}


def foreign_origin(request: web.Request) -> str | None:
    """The request's `Origin` when it is not this server's own (host and port as the client
    addressed it); None for a same-origin request or a client that sends no Origin (curl,
    `streamdiff control`, OBS)."""
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    scheme, sep, rest = origin.partition("://")
    # behind an https proxy the page's origin is the proxy's: the Host it forwards, or the host it
    # names in X-Forwarded-Host or Forwarded (nginx: proxy_set_header Host $http_host; its $host
    # drops a port other than 443, which the page's origin has)
    hosts = {h.lower() for h in (request.host, *forwarded_hosts(request))}
    return None if sep and scheme in ("http", "https") and rest.rstrip("/").lower() in hosts - {""} else origin


# one `name=value` of RFC 7239's Forwarded: a token, then a token or a quoted string (a value a
# proxy left unquoted though it should not be, `host=a.example:8443`, is taken as it is)
_FORWARDED_PAIR = re.compile(r'\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)=("(?:[^"\\]|\\.)*"|[^\s;,"]*)\s*([;,]|$)')


def _forwarded_first_element(header: str) -> dict[str, str]:
    """The first element of a Forwarded header as {name: value}; {} when it is malformed (an
    unterminated quote, a name given twice: a probe's `host=x;host=evil.example` had both trusted)."""
    pairs: dict[str, str] = {}
    pos = 0
    while pos < len(header):
        m = _FORWARDED_PAIR.match(header, pos)
        if m is None or m.group(1).lower() in pairs:
            return {}
        value = m.group(2)
        pairs[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value[1:-1]) if value.startswith('"') else value
        if m.group(3) != ";":
            break
        pos = m.end()
    return pairs


def forwarded_hosts(request: web.Request) -> list[str]:
    """The host a proxy says the client addressed: the first X-Forwarded-Host, and the first
    element's `host=` of RFC 7239's Forwarded."""
    hosts = [request.headers.get("X-Forwarded-Host", "").split(",")[0].strip(),
             _forwarded_first_element(request.headers.get("Forwarded", "")).get("host", "").strip()]
    return [h for h in hosts if h]


def proxied(request: web.Request) -> bool:
    """A proxy passed the request on (it said so in one of the usual headers)."""
    return any(h in request.headers for h in ("X-Forwarded-For", "X-Forwarded-Proto", "X-Forwarded-Host",
                                              "Forwarded", "Via"))


def forwarded_prefix(request: web.Request) -> str:
    """The path a proxy serves this server under (`X-Forwarded-Prefix: /streamdiff`: nginx's
    `location /streamdiff/` with proxy_set_header, Traefik's StripPrefix), so that the addresses
    the server hands out (a WHIP or WHEP resource, a viewer link) resolve through the proxy; ''
    when there is none or it is not a plain path (it only shapes this client's own answer)."""
    prefix = request.headers.get("X-Forwarded-Prefix", "").split(",")[0].strip().rstrip("/")
    if re.fullmatch(r"(/[A-Za-z0-9._~%-]+)*", prefix) and len(prefix) <= 200:
        return prefix
    # refused: said once a value (a probe: `/ström` was dropped without a word, and OBS's DELETE
    # then went outside the proxy's path)
    if prefix not in _REFUSED_PREFIXES and len(_REFUSED_PREFIXES) < 32:
        _REFUSED_PREFIXES.add(prefix)
        log.warning("X-Forwarded-Prefix %r is not used: a plain path of at most 200 characters is (letters, "
                    "digits and . _ ~ %% -, percent-encode the rest); addresses handed out stay at the root",
                    printable(prefix)[:80])
    return ""


_REFUSED_PREFIXES: set[str] = set()


@web.middleware
async def same_origin_control(request: web.Request, handler):
    """Without a token anyone who can reach the server may control it, but not any web page the
    user happens to visit: a page on another origin gets 403 from the control routes (a security
    probe drove a token-less server's /sessions, /ws and params from https://evil.example: every
    reply allowed any origin). With a token the token decides (a controller elsewhere sends it)."""
    if (request.method != "OPTIONS" and not request.app[SETTINGS_KEY].token
            and _control_route(request) and (origin := foreign_origin(request)) is not None):
        text = (f"a page on another origin ({printable(origin)[:80]}) may not use {request.path} of a server "
                f"without a token; start it with --token TOKEN to allow controllers elsewhere")
        text += _proxy_hint(request, origin)
        if CONTROL_JSON.fullmatch(request.match_info.route.resource.canonical):
            return web.json_response({"error": text}, status=403, headers=CORS)  # (its answers are all JSON)
        return error(403, text)
    return await handler(request)


def _control_route(request: web.Request) -> bool:
    """Whether the request was routed to a control route. By the route, not the path: the path is
    decoded, and `DELETE /sessions/a%2Fb` reached the session route as `/sessions/a/b`, which the
    pattern did not take for a control path (a probe)."""
    resource = request.match_info.route.resource
    return resource is not None and CONTROL_PATHS.fullmatch(resource.canonical) is not None


def _proxy_hint(request: web.Request, origin: str) -> str:
    """Behind a proxy, the likely cause of a refusal is a host passed on without the page's port
    (a probe: nginx's `proxy_set_header Host $host` on a proxy at :8443). Said only when the
    proxy passed no host, or one that differs from the page's only by its port: a page elsewhere
    reaching a well set up proxy is told nothing about the proxy."""
    if not proxied(request):
        return ""
    page = host_name(origin.partition("://")[2].rstrip("/"))
    forwarded = forwarded_hosts(request)
    said = [request.host, *forwarded]
    if forwarded and not any(host_name(h) == page for h in said):
        return ""
    return (f"; behind a proxy, have it pass the page's host and port on (nginx: proxy_set_header X-Forwarded-Host "
            f"$http_host): it said {printable(', '.join(said))[:120]}")


def host_name(host: str) -> str:
    """The name in a Host header, without its port or an IPv6 literal's brackets, lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def known_host(host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a Host header names this server as a browser may legitimately address it: an IP
    address, `localhost` (or a name under `.localhost`, which browsers resolve to loopback), or a
    name the operator allowed (`--allow-host`; `*` allows any). A request without a Host header
    (HTTP/1.0) comes from no browser."""
    if host is None:
        return True
    name = host_name(host).rstrip(".")  # a fully qualified `localhost.` is localhost too
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return (name == "localhost" or name.endswith(".localhost") or "*" in allowed
            or name in {a.lower().rstrip(".") for a in allowed})


@web.middleware
async def known_host_only(request: web.Request, handler):
    """Without a token, only requests that address the server by an IP address, `localhost` or an
    allowed name are answered (403 otherwise). DNS rebinding: a web page the user visits can point
    its own name at 127.0.0.1, and its requests are then same-origin to it (the Origin rule above
    passes them): it could open streams, change or end them, and read `/sessions`. Its Host is the
    page's name, which no one allowed. With a token the token decides."""
    settings = request.app[SETTINGS_KEY]
    if request.method != "OPTIONS" and not settings.token:
        # Behind a proxy the Host is the proxy's upstream address, and the name the page used comes in
        # X-Forwarded-Host or Forwarded, which the Origin rule trusts: a rebinding page reached the
        # control routes through a proxy block without a server_name (a probe). That name is held to
        # the same rule.
        host = request.headers.get("Host")
        for given, how in ((host, ""), *((f, " (the name a proxy passed on)") for f in forwarded_hosts(request))):
            if not known_host(given, settings.allowed_hosts):
                name = printable(host_name(given))[:80]
                return error(403, f"this server answers to its IP address or localhost, not {name!r}{how}: start "
                                  f"it with --allow-host {name} (a proxy's public name) or --token TOKEN")
    return await handler(request)


UNAUTHORIZED = "missing or wrong Bearer token (Authorization: Bearer <token>)"


def unauthorized(json_body: bool = False) -> web.Response:
    """401; `json_body` for the JSON endpoints (/offer, params), which answer every refusal as
    {"error": ...}."""
    headers = {**CORS, "WWW-Authenticate": 'Bearer realm="streamdiff"'}
    if json_body:
        return web.json_response({"error": UNAUTHORIZED}, status=401, headers=headers)
    return error(401, UNAUTHORIZED, **headers)


async def add_cors(request: web.Request, response: web.StreamResponse) -> None:
    """`on_response_prepare`: every reply carries the CORS headers, so that a controller on
    another origin can read a JSON answer (or error) as well as pass the preflight."""
    for name, value in CORS.items():
        response.headers.setdefault(name, value)


class QuietMalformedRequests(logging.Filter):
    """For the `aiohttp.server` logger. A request aiohttp cannot parse (a request line or header
    over its limits, a bad Content-Length, an unknown HTTP version) is answered 400 by aiohttp,
    which then logs it at ERROR with a traceback: a client's mistake that any client could use to
    fill the log. Such a record becomes one INFO line (shown with -v) naming the client and why."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        client = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        why = printable(redact_token(" ".join(str(exc.message).split())[:160]))
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.msg, record.args = "refused a malformed HTTP request from %s: %s", (client, why)
        record.exc_info = record.exc_text = None
        return logging.getLogger(record.name).isEnabledFor(logging.INFO)


# `token=` as a query spells it, percent-encoded letters included (aiohttp decodes `%74oken` to the
# same parameter), and a Bearer credential (an Authorization header aiohttp could not parse)
_TOKEN_PARAM = re.compile(r"(?i)([?&](?:t|%74)(?:o|%6f)(?:k|%6b)(?:e|%65)(?:n|%6e)(?:=|%3d))[^&#\s]*")
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\"]+")


def redact_token(text: str) -> str:
    """`text` with every `token=` query value and Bearer credential replaced by `…` (request
    lines and refused requests in logs)."""
    return _BEARER.sub(r"\1…", _TOKEN_PARAM.sub(r"\1…", text))


class AccessLog(AbstractAccessLogger):
    """aiohttp's access log (shown with -v) without the `?token=` the page, viewer.html and
    /ws URLs carry: a security probe found every page load's token in the log."""

    def log(self, request, response, time: float) -> None:
        major, minor = request.version
        self.logger.info('%s "%s %s HTTP/%d.%d" %d %.3f s', request.remote, request.method,
                         printable(redact_token(request.path_qs)), major, minor, response.status, time)


def quiet_malformed_requests() -> None:
    """Install QuietMalformedRequests on aiohttp's server logger (once)."""
    logger = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, QuietMalformedRequests) for f in logger.filters):
        logger.addFilter(QuietMalformedRequests())
