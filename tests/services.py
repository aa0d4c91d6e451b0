"""Start and stop the real servers the third-party integration tests talk to.

* :class:`RedisServer` -- ``redis-server`` (Debian package) on a free loopback port, no
  persistence, in a private temp dir.
* :class:`PostgresServer` -- a throw-away PostgreSQL cluster: ``initdb`` in a temp dir, the
  ``postgres`` binary listening on 127.0.0.1:<free port> (and a unix socket in the temp dir), a
  password (SCRAM) role and a database for the tests.  As root the cluster runs as the
  unprivileged ``postgres`` user (PostgreSQL refuses to run as root).
* :class:`UvicornServer` -- ``python -m uvicorn`` as a child process (this checkout's kbloop on
  its path) with the loop spec under test.

Everything here is plain blocking code (subprocess/socket): it runs in pytest fixtures, outside
the event loop under test, so it behaves the same whichever loop the tests use.
"""
import glob
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

from procutil import subprocess_env


def free_port(host="127.0.0.1"):
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def _stop_process(proc, sig=signal.SIGTERM, timeout=20):
    """Signal ``proc`` (graceful), wait, then SIGKILL if it is still there. Returns rc."""
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
    return proc.returncode


class ServiceError(RuntimeError):
    pass


# ------------------------------------------------------------------------------ redis


class RedisServer:
    BINARY = shutil.which("redis-server") or (
        "/usr/bin/redis-server" if os.path.exists("/usr/bin/redis-server") else None)

    def __init__(self, start_timeout=20):
        if self.BINARY is None:
            raise ServiceError("redis-server binary not found")
        self.host = "127.0.0.1"
        self.dir = tempfile.mkdtemp(prefix="kbloop-redis-")
        self.logfile = os.path.join(self.dir, "redis.log")
        self.proc = None
        last = None
        for _attempt in range(3):  # a free port can be taken before redis binds it: retry
            self.port = free_port()
            try:
                self._start(start_timeout)
                return
            except ServiceError as e:
                last = e
                self._kill()
        self.stop()
        raise last

    def _start(self, timeout):
        log = open(self.logfile, "ab")
        try:
            self.proc = subprocess.Popen(
                [self.BINARY, "--save", "", "--appendonly", "no", "--port", str(self.port),
                 "--bind", "127.0.0.1", "--dir", self.dir, "--daemonize", "no",
                 "--protected-mode", "yes"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"redis-server exited rc={self.proc.returncode}:\n"
                                   f"{_read(self.logfile)}")
            try:
                with socket.create_connection((self.host, self.port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise ServiceError(f"redis-server not ready after {timeout}s:\n{_read(self.logfile)}")

    @property
    def url(self):
        return f"redis://{self.host}:{self.port}/0"

    def _kill(self):
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGTERM, timeout=10)
            self.proc = None

    def stop(self):
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- postgres


def postgres_bindir():
    """The newest /usr/lib/postgresql/<ver>/bin with initdb (or $KBLOOP_PG_BIN)."""
    env = os.environ.get("KBLOOP_PG_BIN")
    if env:
        return env if os.path.exists(os.path.join(env, "initdb")) else None
    found = glob.glob("/usr/lib/postgresql/*/bin/initdb")
    if not found:
        return None
    found.sort(key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0)
    return os.path.dirname(found[-1])


class PostgresServer:
    USER = "kbtest"
    PASSWORD = "kbtest-secret"
    DATABASE = "kbtest"

    def __init__(self, start_timeout=60):
        self.bindir = postgres_bindir()
        if self.bindir is None:
            raise ServiceError("PostgreSQL binaries (initdb/postgres) not found")
        self.host = "127.0.0.1"
        self.proc = None
        # Short path: the unix socket (<dir>/.s.PGSQL.<port>) must fit in sun_path.
        self.dir = tempfile.mkdtemp(prefix="kbpg-")
        self.data = os.path.join(self.dir, "data")
        self.logfile = os.path.join(self.dir, "postgres.log")
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")  # Debian's package creates it
            self.run_as = dict(user=pw.pw_uid, group=pw.pw_gid, extra_groups=[])
            os.chown(self.dir, pw.pw_uid, pw.pw_gid)
        else:
            self.run_as = {}
        os.chmod(self.dir, 0o700)
        try:
            self._initdb()
            last = None
            for _attempt in range(3):
                self.port = free_port()
                try:
                    self._start(start_timeout)
                    break
                except ServiceError as e:
                    last = e
                    self._kill()
            else:
                raise last
            self._psql(f"CREATE ROLE {self.USER} LOGIN PASSWORD '{self.PASSWORD}'",
                       f"CREATE DATABASE {self.DATABASE} OWNER {self.USER}")
        except BaseException:
            self.stop()
            raise

    def _bin(self, name):
        return os.path.join(self.bindir, name)

    def _run(self, argv, timeout=120):
        res = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                             stdin=subprocess.DEVNULL, cwd=self.dir, timeout=timeout,
                             env=self._env(), **self.run_as)
        if res.returncode != 0:
            raise ServiceError(f"{argv[0]} failed rc={res.returncode}:\n"
                               f"{res.stdout.decode(errors='replace')}")
        return res.stdout.decode(errors="replace")

    def _env(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", HOME=self.dir)
        return env

    def _initdb(self):
        self._run([self._bin("initdb"), "-D", self.data, "-U", "postgres", "-E", "UTF8",
                   "--locale=C", "--auth-local=trust", "--auth-host=scram-sha-256",
                   "--no-sync"])

    def _start(self, timeout):
        log = open(self.logfile, "ab")
        try:
            if self.run_as:
                os.chown(self.logfile, self.run_as["user"], self.run_as["group"])
            self.proc = subprocess.Popen(
                [self._bin("postgres"), "-D", self.data, "-k", self.dir, "-p", str(self.port),
                 "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=60", "-c", "shared_buffers=16MB"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                env=self._env(), **self.run_as)
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"postgres exited rc={self.proc.returncode}:\n"
                                   f"{_read(self.logfile)}")
            res = subprocess.run([self._bin("pg_isready"), "-q", "-h", self.host, "-p",
                                  str(self.port), "-t", "1"], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 env=self._env())
            if res.returncode == 0:
                return
            time.sleep(0.1)
        raise ServiceError(f"postgres not ready after {timeout}s:\n{_read(self.logfile)}")

    def _psql(self, *commands):
        argv = [self._bin("psql"), "-X", "-q", "-h", self.dir, "-p", str(self.port),
                "-U", "postgres", "-d", "postgres", "-v", "ON_ERROR_STOP=1"]
        for c in commands:
            argv += ["-c", c]
        return self._run(argv)

    @property
    def dsn(self):
        return (f"postgresql://{self.USER}:{self.PASSWORD}@{self.host}:{self.port}/"
                f"{self.DATABASE}")

    def log(self):
        return _read(self.logfile)

    def _kill(self):
        if self.proc is not None:
            _stop_process(self.proc, signal.SIGINT, timeout=30)  # SIGINT: "fast" shutdown
            self.proc = None

    def stop(self):
        self._kill()
        shutil.rmtree(self.dir, ignore_errors=True)


# ---------------------------------------------------------------------------- uvicorn


class UvicornServer:
    """``python -m uvicorn --app-dir APP_DIR APP --loop LOOP ...`` on 127.0.0.1:<free port>."""

    def __init__(self, app_dir, app, loop_spec, *extra_args, start_timeout=30):
        self.port = free_port()
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, app,
             "--host", "127.0.0.1", "--port", str(self.port), "--loop", loop_spec,
             "--no-access-log", "--timeout-keep-alive", "30", *extra_args],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=subprocess_env())
        try:
            self._wait_accepting(start_timeout)
        except BaseException:
            self.stop()
            raise

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def _wait_accepting(self, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServiceError(f"uvicorn exited rc={self.proc.returncode}:\n"
                                   f"{self.output()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        raise ServiceError(f"uvicorn not accepting after {timeout}s:\n{self.output()}")

    def stop(self):
        return _stop_process(self.proc, signal.SIGTERM, timeout=15)

    def close(self):
        self.stop()
        self.log.close()
