#!/usr/bin/env python3
"""Soak `routelm serve`: many concurrent clients for a while, some of them misbehaving.

    python3 scripts/serve/soak.py URL --pid PID [--minutes 15] [--clients 64]

Each client loops over requests on loopback (plain sockets, standard library only):
  - well-formed chat and completion requests, streamed or whole, with random max_tokens:
    each must get 200 (or a deliberate 429/503 under overload, counted apart);
  - 10% of the streamed ones hang up after the first few events (the server must free
    their slots);
  - malformed JSON and wrong types (must get 400), bodies over the server's limit (413);
plus one slow-loris client that sends half its headers and stalls, and one that trickles
its body: the server must close them. The server's resident memory is sampled every
5 s (start after the first minute's warm-up, peak, end). Exits non-zero on any failure.
"""
import argparse
import json
import random
import socket
import sys
import threading
import time
from urllib.parse import urlparse


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


class Counts:
    def __init__(self):
        self.lock = threading.Lock()
        self.n = {}
        self.failures = []

    def add(self, key, failure=None):
        with self.lock:
            self.n[key] = self.n.get(key, 0) + 1
            if failure and len(self.failures) < 20:
                self.failures.append(failure)


def http(host, port, path, body, read_events=None, timeout=120):
    """POST `body` (bytes); the status and, unless `read_events` is set, the whole
    body. With `read_events`, hang up after that many bytes of the answer."""
    s = socket.create_connection((host, port), timeout=timeout)
    try:
        s.sendall(
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode() + body
        )
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        if not data:
            return 0, b""
        status = int(data.split(b" ", 2)[1])
        if read_events is not None:
            while data.count(b"data:") < read_events:
                chunk = s.recv(4096)
                if not chunk:
                    break
                data += chunk
            return status, data  # and hang up
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return status, data
    finally:
        s.close()


WORDS = "the of and to in a is that for it as with was on be by at this had not are but from".split()


def well_formed(rng, max_words):
    chat = rng.random() < 0.6
    stream = rng.random() < 0.5
    body = {"max_tokens": rng.randint(4, 48), "temperature": rng.choice([0, 0.7, 1.0]),
            "stream": stream, "seed": rng.randint(0, 1 << 30)}
    text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words)))
    if chat:
        body["messages"] = [{"role": "user", "content": text}]
        if rng.random() < 0.2:
            body["logprobs"] = True
            body["top_logprobs"] = 3
    else:
        body["prompt"] = text
    if rng.random() < 0.1:
        body["routelm"] = {"routes": True}
    return ("/v1/chat/completions" if chat else "/v1/completions"), body


MALFORMED = [
    b"{", b"[]", b"null", b'{"messages": 3}', b'{"messages": [{"role": 1}]}',
    b'{"prompt": "x", "max_tokens": -1}', b'{"prompt": "x", "temperature": "hot"}',
    b'{"prompt": [99999999999]}', b'{"prompt": "x", "top_p": 0}', b"\xff\xfe\x00",
    b'{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}',
]


def client(i, args, host, port, counts, stop):
    rng = random.Random(i)
    while time.time() < stop:
        r = rng.random()
        try:
            if r < 0.05:
                status, _ = http(host, port, rng.choice(["/v1/completions", "/v1/chat/completions"]),
                                 rng.choice(MALFORMED))
                counts.add(f"malformed→{status}", None if status == 400 else f"malformed got {status}")
            elif r < 0.07:
                status, _ = http(host, port, "/v1/completions", b'{"prompt": "' + b"a" * (args.body_kb + 1) * 1024 + b'"}')
                counts.add(f"oversized→{status}", None if status == 413 else f"oversized got {status}")
            else:
                path, body = well_formed(rng, args.max_words)
                hang_up = body["stream"] and rng.random() < args.disconnect
                status, data = http(host, port, path, json.dumps(body).encode(),
                                     read_events=2 if hang_up else None)
                if status in (429, 503):
                    counts.add(f"overload {status}")
                    time.sleep(0.2)
                elif status != 200:
                    counts.add(f"error {status}", f"{path} {status}: {data[-300:]!r}")
                elif hang_up:
                    counts.add("hung up mid-stream")
                elif body["stream"] and b"[DONE]" not in data:
                    counts.add("stream without [DONE]", f"{path}: {data[-300:]!r}")
                else:
                    counts.add("answered")
        except OSError as e:
            counts.add("connection error", f"{type(e).__name__}: {e}")


def slow_loris(host, port, counts, stop, body):
    while time.time() < stop:
        try:
            s = socket.create_connection((host, port), timeout=120)
            if body:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{")
            else:
                s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-")
            t0 = time.time()
            while True:
                if body:
                    try:
                        s.sendall(b" ")  # one byte every 2 s
                    except OSError:
                        break
                try:
                    s.settimeout(2)
                    if not s.recv(4096):
                        break
                except socket.timeout:
                    continue
                except OSError:
                    break
            held = time.time() - t0
            counts.add("slow client closed" if held < 120 else "slow client held",
                       None if held < 120 else f"a slow client was held {held:.0f} s")
            s.close()
        except OSError as e:
            counts.add("connection error", f"slow client: {e}")
            time.sleep(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("url")
    ap.add_argument("--pid", type=int, required=True)
    ap.add_argument("--minutes", type=float, default=15)
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--disconnect", type=float, default=0.1)
    ap.add_argument("--max-words", type=int, default=30,
                    help="prompts of 1 to this many words (fit the model's context)")
    ap.add_argument("--body-kb", type=int, default=1024, help="the server's --max-body-kb")
    args = ap.parse_args()
    u = urlparse(args.url)
    host, port = u.hostname, u.port
    counts = Counts()
    t0 = time.time()
    stop = t0 + args.minutes * 60
    threads = [threading.Thread(target=client, args=(i, args, host, port, counts, stop), daemon=True)
               for i in range(args.clients)]
    threads += [threading.Thread(target=slow_loris, args=(host, port, counts, stop, b), daemon=True)
                for b in (False, True)]
    for t in threads:
        t.start()
    samples = []
    while any(t.is_alive() for t in threads):
        samples.append((time.time() - t0, rss_mb(args.pid)))
        with counts.lock:
            line = ", ".join(f"{k} {v}" for k, v in sorted(counts.n.items()))
        print(f"[{samples[-1][0]:6.0f} s] RSS {samples[-1][1]:7.1f} MB | {line}", flush=True)
        time.sleep(5)
    samples.append((time.time() - t0, rss_mb(args.pid)))
    warm = [m for t, m in samples if t >= min(60, args.minutes * 60 / 4)]
    print(f"resident memory: start {warm[0]:.1f} MB (after warm-up), peak {max(warm):.1f} MB, "
          f"end {warm[-1]:.1f} MB (first sample {samples[0][1]:.1f} MB)")
    print("counts:", json.dumps(counts.n, sort_keys=True))
    ok = not counts.failures
    for f in counts.failures:
        print("FAILURE:", f)
    try:
        rss_mb(args.pid)
    except FileNotFoundError:
        print("FAILURE: the server is gone")
        ok = False
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
