#!/usr/bin/env python3
"""Floods a Matrix homeserver the way abusive clients would, for the flood benchmark in
docs/benchmarks.md: N clients (default 200), each in a closed loop for a bounded time,
sending messages as fast as they are answered, joining and leaving rooms, and asking for
thumbnails of one image in ever-changing sizes. Rate-limited answers (429) are honoured
like a well-written client would not: the flood retries at once, to keep the pressure on.

Standard library only (threads and http.client), so it runs anywhere Python 3.9+ does.
It prints one JSON line: requests per kind and status, and latency percentiles.

    scripts/flood.py --url http://127.0.0.1:8008 --clients 200 --duration 60
"""

import argparse
import http.client
import json
import random
import signal
import struct
import sys
import threading
import time
import urllib.parse
import uuid
import zlib

PASSWORD = "flood-password-1"
# Set on SIGTERM: the flooders stop and the tally is printed.
STOP = threading.Event()


def png(width, height):
    """A small gradient PNG, so the server has something real to scale."""
    rows = b"".join(
        b"\x00" + b"".join(bytes((x * 255 // width, y * 255 // height, 128)) for x in range(width))
        for y in range(height)
    )

    def chunk(kind, data):
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


class Client:
    """One HTTP/1.1 connection to the server (reopened after errors)."""

    def __init__(self, url, token=None):
        parsed = urllib.parse.urlparse(url)
        self.host, self.port = parsed.hostname, parsed.port or 80
        self.token = token
        self.conn = None

    def request(self, method, path, body=None, content_type="application/json"):
        if self.conn is None:
            self.conn = http.client.HTTPConnection(self.host, self.port, timeout=120)
        headers = {}
        if self.token:
            headers["Authorization"] = "Bearer " + self.token
        if body is not None and not isinstance(body, bytes):
            body = json.dumps(body).encode()
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            self.conn.request(method, path, body=body, headers=headers)
            response = self.conn.getresponse()
            data = response.read()
            return response.status, data
        except (OSError, http.client.HTTPException):
            self.conn.close()
            self.conn = None
            return 0, b""


def json_of(data):
    try:
        return json.loads(data)
    except ValueError:
        return {}


def register(url, name):
    client = Client(url)
    body = {"username": name, "password": PASSWORD, "auth": {"type": "m.login.dummy"}}
    for _ in range(600):
        status, data = client.request("POST", "/_matrix/client/v3/register", body)
        answer = json_of(data)
        if status == 200:
            return answer["access_token"], answer["user_id"]
        if status == 401 and "session" in answer:
            body["auth"]["session"] = answer["session"]
            continue
        if status == 429:
            time.sleep(answer.get("retry_after_ms", 1000) / 1000)
            continue
        raise SystemExit(f"cannot register {name}: {status} {data[:200]!r}")
    raise SystemExit(f"cannot register {name}: still refused")


class Tally:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = {}
        self.latencies = {}

    def add(self, kind, status, seconds):
        with self.lock:
            key = f"{kind} {status}"
            self.counts[key] = self.counts.get(key, 0) + 1
            self.latencies.setdefault(kind, []).append(seconds)

    def summary(self, duration):
        out = {"counts": dict(sorted(self.counts.items())), "per_s": {}, "latency_ms": {}}
        for kind, values in sorted(self.latencies.items()):
            values.sort()
            pick = lambda q: round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)
            out["per_s"][kind] = round(len(values) / duration, 1)
            out["latency_ms"][kind] = {"p50": pick(0.5), "p99": pick(0.99), "max": round(values[-1] * 1000, 1)}
        return out


def flooder(url, token, rooms, media, mix, deadline, tally, seed):
    """One abusive client: messages to its home room, joins and leaves of the others,
    thumbnails in random sizes."""
    rng = random.Random(seed)
    client = Client(url, token)
    kinds = [kind for kind, weight in mix for _ in range(weight)]
    home = rooms[seed % len(rooms)]
    others = [room for room in rooms if room != home] or rooms
    joined = set()
    while time.monotonic() < deadline and not STOP.is_set():
        kind = rng.choice(kinds)
        room = rng.choice(others)
        started = time.monotonic()
        if kind == "message":
            path = f"/_matrix/client/v3/rooms/{urllib.parse.quote(home)}/send/m.room.message/{uuid.uuid4().hex}"
            status, _ = client.request("PUT", path, {"msgtype": "m.text", "body": "flood " + "x" * rng.randrange(200)})
        elif kind == "join":
            if room in joined:
                status, _ = client.request("POST", f"/_matrix/client/v3/rooms/{urllib.parse.quote(room)}/leave", {})
                joined.discard(room)
            else:
                status, _ = client.request("POST", f"/_matrix/client/v3/join/{urllib.parse.quote(room)}", {})
                joined.add(room)
        else:
            server, media_id = media
            width, height = rng.randrange(16, 1600), rng.randrange(16, 1600)
            method = rng.choice(["scale", "crop"])
            path = (
                f"/_matrix/client/v1/media/thumbnail/{server}/{media_id}"
                f"?width={width}&height={height}&method={method}"
            )
            status, _ = client.request("GET", path)
        tally.add(kind, status, time.monotonic() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="base URL, http:// on loopback")
    parser.add_argument("--clients", type=int, default=200)
    parser.add_argument("--rooms", type=int, default=20, help="public rooms the flood sends to and joins")
    parser.add_argument("--duration", type=float, default=60, help="seconds of flooding")
    parser.add_argument("--mix", default="message:5,join:2,thumbnail:3", help="kind:weight,...")
    parser.add_argument("--prefix", default="flood" + uuid.uuid4().hex[:6])
    args = parser.parse_args()
    mix = [(kind, int(weight)) for kind, weight in (part.split(":") for part in args.mix.split(","))]

    users = [register(args.url, f"{args.prefix}_{i}") for i in range(args.clients)]
    owner = Client(args.url, users[0][0])
    rooms = []
    for _ in range(args.rooms):
        status, data = owner.request("POST", "/_matrix/client/v3/createRoom", {"preset": "public_chat"})
        if status != 200:
            raise SystemExit(f"createRoom: {status} {data[:200]!r}")
        rooms.append(json_of(data)["room_id"])
    status, data = owner.request("POST", "/_matrix/media/v3/upload", png(640, 480), content_type="image/png")
    if status != 200:
        raise SystemExit(f"upload: {status} {data[:200]!r}")
    media = json_of(data)["content_uri"][len("mxc://") :].split("/", 1)

    # Each flooder sends to a home room it joined beforehand.
    for i, (token, _) in enumerate(users):
        home = rooms[i % len(rooms)]
        status, data = Client(args.url, token).request("POST", f"/_matrix/client/v3/join/{urllib.parse.quote(home)}", {})
        if status != 200:
            raise SystemExit(f"join: {status} {data[:200]!r}")

    tally = Tally()
    deadline = time.monotonic() + args.duration
    threads = [
        threading.Thread(target=flooder, args=(args.url, token, rooms, media, mix, deadline, tally, i), daemon=True)
        for i, (token, _) in enumerate(users)
    ]
    started = time.monotonic()
    for thread in threads:
        thread.start()
    print("flooding", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: STOP.set())
    for thread in threads:
        while thread.is_alive():
            thread.join(0.5)
    summary = tally.summary(time.monotonic() - started)
    summary["clients"] = args.clients
    print(json.dumps(summary))


if __name__ == "__main__":
    sys.exit(main())
