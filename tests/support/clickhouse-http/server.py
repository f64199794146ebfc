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
- errors as HTTP 500 with the engine's `Code: N. DB::Exception: ...` text and
  the `X-ClickHouse-Exception-Code` header.

Tests control it through `/__control` (JSON): `{"hold_inserts": true}` makes
inserts execute but their answers wait until released (to kill a client
between insert and acknowledgement); `{"down": true}` answers every query
with a network-level failure (connection closed), as an outage would.

Usage: server.py --data DIR [--port 0]; prints "listening on HOST:PORT".
"""

import argparse
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

RESERVED = {
    "query", "database", "default_format", "compress", "decompress", "user",
    "password", "query_id", "session_id", "session_timeout", "wait_end_of_query",
}
METHOD_LZ4 = 0x82
METHOD_NONE = 0x02

STATE = {"hold_inserts": False, "down": False, "held": 0, "inserts": 0, "queries": 0}
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
    with ENGINE_LOCK:
        if database and database != "default":
            try:
                SESSION.query(f"USE `{database}`")
            except Exception:  # the database may not exist yet (CREATE DATABASE)
                SESSION.query("USE default")
        try:
            result = SESSION.query(sql, fmt)
        except Exception as exc:  # chDB raises its own error type
            raise engine_error(exc) from None
    return result.bytes() if result is not None else b""


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
            answer = self.execute(params, body)
        except ClickHouseError as e:
            return self.reply(500, (e.text + "\n").encode(), headers={"X-ClickHouse-Exception-Code": str(e.code)})
        if params.get("compress") == "1":
            answer = compress_blocks(answer)
        self.reply(200, answer, "application/octet-stream")

    def execute(self, params, body):
        database = params.get("database")
        query_params = {k[len("param_"):]: v for k, v in params.items() if k.startswith("param_")}
        settings = {k: v for k, v in params.items() if k not in RESERVED and not k.startswith("param_")}
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
    global SESSION, TMPDIR
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.data, exist_ok=True)
    TMPDIR = tempfile.mkdtemp(prefix="inserts-", dir=args.data)
    SESSION = chdb_session.Session(os.path.join(args.data, "chdb"))
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
