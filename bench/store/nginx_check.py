#!/usr/bin/env python3
"""Checks bench/store/nginx-prefix.conf with a real nginx and two stand-in HTTP backends (each
answers with its own name, like two kvcrunch servers would serve from their own caches):
  - the same X-Prefix-Key always reaches the same backend; 40 keys use both backends;
  - requests without the header are spread over both;
  - a backend that is down: its keys go to the other one (proxy_next_upstream), none fails.
Exit 0 on success, 77 when nginx is not installed (Debian: apt-get install nginx), 1 on failure.
"""
import http.client
import http.server
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def serve_backend(name, port):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()


def backend(name, port):
    # A separate process, so that killing it drops its keep-alive connections too (a dead server).
    p = subprocess.Popen([sys.executable, os.path.abspath(__file__), "--backend", name, str(port)])
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return p
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"backend {name} did not start")


def get(port, key):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    c.request("GET", "/v1/models", headers={"X-Prefix-Key": key} if key is not None else {})
    r = c.getresponse()
    body = r.read().decode()
    c.close()
    if r.status != 200:
        raise RuntimeError(f"status {r.status}: {body}")
    return body


def main():
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if not nginx:
        print("nginx not installed: skipped")
        return 77
    front, pa, pb = free_port(), free_port(), free_port()
    conf = open(os.path.join(HERE, "nginx-prefix.conf")).read()
    conf = conf.replace("18080", str(front)).replace("18081", str(pa)).replace("18082", str(pb))
    d = tempfile.mkdtemp(prefix="kvc-nginx-")
    open(os.path.join(d, "nginx.conf"), "w").write(conf)
    a, b = backend("A", pa), backend("B", pb)
    proc = subprocess.Popen([nginx, "-p", d, "-c", os.path.join(d, "nginx.conf"), "-g", "daemon off;"],
                            stderr=subprocess.PIPE)
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", front), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        keys = [f"prefix-{i:03d}" for i in range(40)]
        owner = {k: get(front, k) for k in keys}
        for k in keys:
            for _ in range(3):
                assert get(front, k) == owner[k], f"{k} moved"
        used = set(owner.values())
        assert used == {"A", "B"}, f"keys used only {used}"
        spread = {get(front, None) for _ in range(30)}
        assert spread == {"A", "B"}, f"headerless requests used only {spread}"
        print(f"consistent: 40 keys -> A {sum(v == 'A' for v in owner.values())}, "
              f"B {sum(v == 'B' for v in owner.values())}; headerless spread over {sorted(spread)}")
        a.kill()
        a.wait()
        after = {k: get(front, k) for k in keys}
        assert set(after.values()) == {"B"}, after
        moved = sum(owner[k] != after[k] for k in keys)
        print(f"A down: all 40 keys answered by B ({moved} moved), no failed request")
        return 0
    except (AssertionError, RuntimeError, OSError) as e:
        print(f"FAILED: {e}")
        return 1
    finally:
        for p in (a, b):
            p.kill()
            p.wait()
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--backend":
        serve_backend(sys.argv[2], int(sys.argv[3]))
    sys.exit(main())
