#!/usr/bin/env python3
"""ClickHouse's HTTP interface on top of chDB, for Tailgate's tests.

No current ClickHouse server installs from the package registries here, but
chDB embeds the ClickHouse engine in-process. This server speaks exactly the
part of the HTTP protocol that the `clickhouse` Rust crate uses:

- the query in the body, in the `query` parameter, or in multipart/form-data;
  output in the `default_format` parameter; `database`; `param_*` query
  parameters; other parameters are settings;
- INSERT bodies (RowBinary / RowBinaryWithNamesAndTypes), LZ4-compressed
  ClickHouse blocks when `decompress=1`, executed from a temporary file with
  `INSERT ... FROM INFILE`, the insert's settings between `FROM INFILE` and
  `FORMAT`;
- compressed responses (`compress=1`) in the same block framing with a
  CityHash128 checksum;
- errors with the engine's `Code: N. DB::Exception: ...` text, the
  `X-ClickHouse-Exception-Code` header, and the HTTP status ClickHouse gives
  that code.

Where the real server refuses a request, so does this one (README.md beside
this file lists each behaviour and the ClickHouse source it follows): a
database context naming a missing database, unknown credentials, an unknown
setting.

Tests control it through `/__control` (JSON): `{"hold_inserts": true}` makes
inserts execute but their answers wait until released (to kill a client
between insert and acknowledgement); `{"down": true}` answers every query
with a network-level failure (connection closed), as an outage would.

Usage: server.py --data DIR [--port 0]; prints "listening on HOST:PORT".
"""

import argparse
import base64
import email.parser
import email.policy
import json
import os
import re
import struct
import sys
import tempfile
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import lz4.block
from chdb import session as chdb_session
from clickhouse_cityhash.cityhash import CityHash128

# URL parameters that ClickHouse's HTTP handler reads itself; every other
# one is a setting (src/Server/HTTPHandler.cpp, `reserved_param_names`).
RESERVED = {
    "query", "database", "default_format", "compress", "decompress", "user",
    "password", "quota_key", "query_id", "stacktrace", "role", "session_id",
    "session_timeout", "session_check", "client_protocol_version",
    "close_session", "buffer_size", "wait_end_of_query",
}

# exceptionCodeToHTTPStatus (src/Server/HTTP/exceptionCodeToHTTPStatus.cpp),
# for the codes this engine can give; any other code is 500.
HTTP_STATUS = {
    194: 401,  # REQUIRED_PASSWORD
    192: 403, 193: 403, 516: 403, 497: 403,  # UNKNOWN_USER, WRONG_PASSWORD, AUTHENTICATION_FAILED, ACCESS_DENIED
    36: 400, 27: 400, 62: 400, 117: 400, 53: 400, 16: 400, 15: 400, 69: 400,  # BAD_ARGUMENTS, CANNOT_PARSE_TEXT, SYNTAX_ERROR, INCORRECT_DATA, TYPE_MISMATCH, NO_SUCH_COLUMN_IN_TABLE, DUPLICATE_COLUMN, ARGUMENT_OUT_OF_BOUND
    60: 404, 46: 404, 47: 404, 50: 404, 56: 404, 81: 404, 115: 404, 73: 404,  # UNKNOWN_TABLE, _FUNCTION, _IDENTIFIER, _TYPE, _STORAGE, _DATABASE, _SETTING, _FORMAT
    48: 501,  # NOT_IMPLEMENTED
}
METHOD_LZ4 = 0x82
METHOD_NONE = 0x02

STATE = {"hold_inserts": False, "down": False, "held": 0, "inserts": 0, "queries": 0}
USERS = {"default": ""}  # a fresh server: user `default`, no password
SETTINGS = frozenset()  # every setting name the engine knows, read at start
STATE_LOCK = threading.Condition()
ENGINE_LOCK = threading.Lock()  # chDB allows one data path per process: serialise.
SESSION = None
TMPDIR = None


class ClickHouseError(Exception):
    def __init__(self, code, text):
        super().__init__(text)
        self.code = code
        self.text = text


def engine_error(exc):
    text = str(exc)
    m = re.search(r"Code: (\d+)\.", text)
    code = int(m.group(1)) if m else 1000
    if "DB::Exception" not in text:
        text = f"Code: {code}. DB::Exception: {text}"
    return ClickHouseError(code, text)


def checksum(data):
    # ClickHouse writes the 128-bit CityHash as two little-endian 64-bit
    # halves, the binding's high half first.
    h = CityHash128(data)
    return struct.pack("<QQ", h >> 64, h & 0xFFFFFFFFFFFFFFFF)


def decompress_blocks(body):
    out = bytearray()
    pos = 0
    while pos < len(body):
        if len(body) - pos < 25:
            raise ClickHouseError(432, "Code: 432. DB::Exception: truncated compressed block")
        header = body[pos + 16:pos + 25]
        method, compressed_size, raw_size = struct.unpack("<BII", header)
        block = body[pos + 16:pos + 16 + compressed_size]
        if checksum(block) != body[pos:pos + 16]:
            raise ClickHouseError(40, "Code: 40. DB::Exception: Checksum doesn't match: corrupted data")
        payload = block[9:]
        if method == METHOD_LZ4:
            out += lz4.block.decompress(payload, uncompressed_size=raw_size)
        elif method == METHOD_NONE:
            out += payload
        else:
            raise ClickHouseError(89, f"Code: 89. DB::Exception: Unknown compression method: {method:#x}")
        pos += 16 + compressed_size
    return bytes(out)


def compress_blocks(data, block_size=1 << 20):
    out = bytearray()
    for start in range(0, max(len(data), 1), block_size):
        raw = data[start:start + block_size]
        payload = lz4.block.compress(raw, store_size=False)
        block = struct.pack("<BII", METHOD_LZ4, len(payload) + 9, len(raw)) + payload
        out += checksum(block) + block
    return bytes(out)


def quote(value):
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def substitute_params(sql, params):
    def repl(m):
        name = m.group(1)
        if name not in params:
            raise ClickHouseError(456, f"Code: 456. DB::Exception: Substitution `{name}` is not set")
        return quote(params[name])
    return re.sub(r"\{(\w+):[^}]+\}", repl, sql)


INSERT_RE = re.compile(r"^\s*INSERT\s+INTO\s+(.+?)\s+FORMAT\s+(\w+)\s*$", re.I | re.S)


def run(sql, fmt, database):
    """Runs `sql` in `database`, as the server does: the context is set
    before the query is parsed, so a missing database fails even a
    `CREATE DATABASE` (code 81). Without a context, the user's default
    database, `default`; never the previous request's."""
    with ENGINE_LOCK:
        try:
            SESSION.query(f"USE `{database or 'default'}`")
            result = SESSION.query(sql, fmt)
        except Exception as exc:  # chDB raises its own error type
            raise engine_error(exc) from None
    return result.bytes() if result is not None else b""


def credentials(headers, params):
    """The user and password, taken as ClickHouse's `authenticateUserByHTTP`
    does: Basic authorization, the X-ClickHouse-User/-Key headers, or the
    `user`/`password` parameters, and refused when mixed."""
    header_user = headers.get("X-ClickHouse-User")
    header_key = headers.get("X-ClickHouse-Key")
    authorization = headers.get("Authorization")
    param_user = params.get("user")
    param_password = params.get("password")
    given = [m for m, present in (
        ("Authorization header", authorization is not None),
        ("X-ClickHouse HTTP headers", header_user is not None or header_key is not None),
        ("URL parameters", param_user is not None or param_password is not None),
    ) if present]
    if len(given) > 1:
        raise ClickHouseError(516, "Code: 516. DB::Exception: Invalid authentication: it is not allowed "
                              f"to use {given[0]} and {given[1]} simultaneously. (AUTHENTICATION_FAILED)")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() != "basic":
            raise ClickHouseError(516, "Code: 516. DB::Exception: Invalid authentication: "
                                  f"'{scheme}' HTTP Authorization scheme is not supported. (AUTHENTICATION_FAILED)")
        user, _, password = base64.b64decode(value).decode("utf-8", "replace").partition(":")
        return user, password
    if header_user is not None or header_key is not None:
        return header_user or "default", header_key or ""
    return param_user or "default", param_password or ""


def authenticate(user, password):
    if USERS.get(user) != password:
        raise ClickHouseError(516, f"Code: 516. DB::Exception: {user}: Authentication failed: password is "
                              "incorrect, or there is no user with such name. (AUTHENTICATION_FAILED)")


def check_settings(settings):
    for name in settings:
        if name not in SETTINGS and not name.startswith("custom_"):
            raise ClickHouseError(115, f"Code: 115. DB::Exception: Setting {name} is neither a builtin setting "
                                  "nor started with the prefix 'custom_' registered for user-defined settings. "
                                  "(UNKNOWN_SETTING)")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # quiet: tests read stdout for the port only
        pass

    def do_GET(self):
        if self.path.startswith("/ping") or self.path == "/":
            return self.reply(200, b"Ok.\n")
        if self.path.startswith("/__control"):
            with STATE_LOCK:
                return self.reply(200, json.dumps(STATE).encode(), "application/json")
        self.handle_query(b"")

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = self.read_chunked()
        else:
            body = self.rfile.read(length) if length else b""
        if self.path.startswith("/__control"):
            changes = json.loads(body or b"{}")
            with STATE_LOCK:
                STATE.update({k: v for k, v in changes.items() if k in ("hold_inserts", "down")})
                STATE_LOCK.notify_all()
                return self.reply(200, json.dumps(STATE).encode(), "application/json")
        self.handle_query(body)

    def read_chunked(self):
        data = bytearray()
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip(), 16)
            if size == 0:
                self.rfile.readline()
                return bytes(data)
            data += self.rfile.read(size)
            self.rfile.readline()

    def reply(self, status, body, content_type="text/plain; charset=UTF-8", headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def handle_query(self, body):
        with STATE_LOCK:
            if STATE["down"]:
                # As unreachable as a live process can be: close without an answer.
                self.close_connection = True
                self.connection.close()
                return
            STATE["queries"] += 1
        url = urllib.parse.urlparse(self.path)
        params = dict(urllib.parse.parse_qsl(url.query, keep_blank_values=True))
        content_type = self.headers.get("Content-Type", "")
        if content_type.startswith("multipart/form-data"):
            msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
                b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
            for part in msg.iter_parts():
                name = part.get_param("name", header="content-disposition")
                params[name] = part.get_content() if isinstance(part.get_content(), str) else part.get_content().decode()
            body = b""
        try:
            authenticate(*credentials(self.headers, params))
            answer = self.execute(params, body, self.headers.get("X-ClickHouse-Database"))
        except ClickHouseError as e:
            return self.reply(HTTP_STATUS.get(e.code, 500), (e.text + "\n").encode(),
                              headers={"X-ClickHouse-Exception-Code": str(e.code)})
        if params.get("compress") == "1":
            answer = compress_blocks(answer)
        self.reply(200, answer, "application/octet-stream")

    def execute(self, params, body, header_database):
        # The header wins over the parameter, as in HTTPHandler::processQuery.
        database = header_database or params.get("database")
        query_params = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items() if k not in RESERVED and not k.startswith("param_")}
        # Checked for every query; applied to inserts only (see README.md).
        check_settings(settings)
        fmt = params.get("default_format") or "TabSeparated"
        if params.get("decompress") == "1" and body:
            body = decompress_blocks(body)
        query = params.get("query")
        insert = INSERT_RE.match(query) if query else None
        if insert:
            return self.insert(insert.group(1), insert.group(2), body, settings, database)
        sql = ((query + "\n") if query else "") + body.decode("utf-8")
        sql = substitute_params(sql, query_params) if query_params else sql
        return run(sql, fmt, database)

    def insert(self, target, fmt, data, settings, database):
        fd, path = tempfile.mkstemp(dir=TMPDIR, suffix=".bin")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            clause = ""
            if settings:
                clause = " SETTINGS " + ", ".join(f"{k} = {quote(v)}" for k, v in settings.items())
            run(f"INSERT INTO {target} FROM INFILE {quote(path)}{clause} FORMAT {fmt}", "TabSeparated", database)
        finally:
            os.unlink(path)
        with STATE_LOCK:
            STATE["inserts"] += 1
            if STATE["hold_inserts"]:
                STATE["held"] += 1
                STATE_LOCK.notify_all()
                STATE_LOCK.wait_for(lambda: not STATE["hold_inserts"])
                STATE["held"] -= 1
        return b""


def main():
    global SESSION, TMPDIR, SETTINGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--user", action="append", default=[], metavar="NAME:PASSWORD",
                    help="a user the server accepts, instead of `default` without a password")
    args = ap.parse_args()
    if args.user:
        USERS.clear()
        USERS.update(u.partition(":")[::2] for u in args.user)
    os.makedirs(args.data, exist_ok=True)
    TMPDIR = tempfile.mkdtemp(prefix="inserts-", dir=args.data)
    SESSION = chdb_session.Session(os.path.join(args.data, "chdb"))
    SETTINGS = frozenset(SESSION.query("SELECT name FROM system.settings", "TabSeparated").bytes().decode().split())
    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    host, port = server.server_address[:2]
    print(f"listening on {host}:{port}", flush=True)
    try:
        server.serve_forever()
    finally:
        SESSION.close()


if __name__ == "__main__":
    sys.exit(main())
