"""A child process that reports on stdout in tagged lines ("READY {...}"), for the DPDK tests:
a thread collects the lines as they come, expect(tag) waits for one, and a child that has to be
killed has its DPDK runtime files cleaned up for it (it cannot do that itself)."""

import ctypes
import os
import queue
import shutil
import signal
import subprocess
import threading
import time

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1


def _die_with_parent():
    _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class Child:
    live = []       # children not reaped yet: a fixture kills them after a failing test

    def __init__(self, cmd, *, env=None, cwd=None, runtime_dirs=(), what="child", stdin=None):
        self.what = what
        self.runtime_dirs = list(runtime_dirs)
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=stdin, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True,
                                     preexec_fn=_die_with_parent)
        Child.live.append(self)
        self.lines = queue.Queue()
        self.seen = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def expect(self, tag, timeout=30):
        """The rest of the first line that starts with `tag `, waiting up to timeout."""
        end = time.monotonic() + timeout
        for line in self.seen:
            if line == tag or line.startswith(tag + " "):
                return line[len(tag) + 1:]
        while (left := end - time.monotonic()) > 0:
            try:
                line = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break
            self.seen.append(line)
            if line == tag or line.startswith(tag + " "):
                return line[len(tag) + 1:]
        self.kill()
        raise AssertionError(f"no {tag} line from the {self.what}; got {self.seen}; stderr: "
                             + self.proc.stderr.read()[-3000:])

    def wait(self, timeout=30):
        """Its exit status, once it has exited (killed after timeout)."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            for path in self.runtime_dirs:
                shutil.rmtree(path.format(pid=self.proc.pid), ignore_errors=True)
        if self in Child.live:
            Child.live.remove(self)


def kill_leftovers():
    while Child.live:
        Child.live[-1].kill()
