"""What the three systems' harnesses share: starting server processes that die with the
harness, reading a process's CPU time and memory from /proc, a data directory's size on disk,
free loopback ports, percentiles, and the 128-byte values every put writes."""

import ctypes
import os
import signal
import socket
import subprocess
import time

# Linux prctl(PR_SET_PDEATHSIG): a server dies when the harness does, however it ends.
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent():
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def spawn(args, log_path, env=None):
    """Start a server process whose output goes to `log_path`."""
    log = open(log_path, "wb")
    p = subprocess.Popen(
        args,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        preexec_fn=_die_with_parent,
    )
    log.close()
    return p


def stop_all(procs):
    """SIGTERM, then SIGKILL whatever is still there after 5 s."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + 5
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """utime + stime of a process, in seconds (/proc/<pid>/stat fields 14 and 15)."""
    with open(f"/proc/{pid}/stat") as f:
        s = f.read()
    fields = s[s.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TCK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def disk_mib(path):
    """Space a directory takes on disk (allocated blocks, as `du`)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total / (1 << 20)


def free_port(ip):
    """A TCP port free on `ip` (UDP-free too, for QUIC)."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((ip, 0))
            port = s.getsockname()[1]
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind((ip, port))
            return port
        except OSError:
            continue
    raise RuntimeError(f"no free port on {ip}")


def node_ips(base):
    """Three loopback addresses from 127.0.0.<base>; 127.0.0.1 if those are unusable."""
    ips = [f"127.0.0.{base + i}" for i in range(3)]
    try:
        for ip in ips:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((ip, 0))
        return ips
    except OSError:
        return ["127.0.0.1"] * 3


def wait_until(what, timeout, f, interval=0.05):
    """Poll `f` until it returns something truthy; raise after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            r = f()
            if r:
                return r
        except Exception as e:  # a server still starting refuses connections
            last = e
        else:
            last = None
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout} s waiting for {what} (last error: {last})")
        time.sleep(interval)


def value(rng, tag=""):
    """A new 128-byte ASCII value (JSON-safe), starting with `tag`."""
    body = tag + ":" + rng.randbytes(64).hex()
    return body[:128]


def pct(sorted_values, p):
    if not sorted_values:
        return float("nan")
    i = min(len(sorted_values) - 1, int(round(p * (len(sorted_values) - 1))))
    return sorted_values[i]
