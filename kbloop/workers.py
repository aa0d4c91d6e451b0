"""One loop per core, sharing nothing: a supervisor that runs N worker processes.

Each worker is a separate process with its own kbloop loop, pinned to its own core when there
are enough cores.  The workers share the listening port through SO_REUSEPORT: in a worker,
KBLOOP_REUSE_PORT=1 makes create_server() default to reuse_port=True, so unmodified servers
share their port without a code change.  The kernel spreads new connections over the workers.

The supervisor restarts a worker that dies, reporting it on stderr, and on SIGINT or SIGTERM
stops every worker (SIGTERM, then SIGKILL after a grace period) and exits 0.

    python -m kbloop --workers 4 server.py --port 8000
    kbloop.serve(main, workers=4)          # main: a coroutine function, run in each worker
"""
import os
import signal
import subprocess
import sys
import time

GRACE_SECONDS = 5.0
# A worker that dies this fast after its start is failing, not crashing once: stop restarting.
MIN_UPTIME = 1.0
MAX_QUICK_DEATHS = 5


def worker_env(index, workers, cpus):
    """The environment of worker `index`: port sharing and, if possible, its own core."""
    env = dict(os.environ)
    env['KBLOOP_REUSE_PORT'] = '1'
    env['KBLOOP_WORKER'] = str(index)
    env['KBLOOP_WORKERS'] = str(workers)
    if cpus and 'KBLOOP_CPU' not in os.environ:
        env['KBLOOP_CPU'] = str(cpus[index % len(cpus)])
    return env


def default_cpus(workers):
    """Pin workers to distinct cores when there are at least as many cores as workers."""
    cpus = sorted(os.sched_getaffinity(0))
    return cpus if workers <= len(cpus) else None


class Supervisor:
    """Keep `workers` workers running until told to stop.  start_worker(index) starts one and
    returns a handle with pid, poll(), send_signal(), wait(timeout) and kill() (a Popen, or a
    _ForkedWorker)."""

    def __init__(self, start_worker, workers, log=sys.stderr):
        if workers < 1:
            raise ValueError(f'workers must be >= 1, got {workers}')
        self.start_worker = start_worker
        self.workers = workers
        self.log = log
        self.procs = {}            # index -> worker handle
        self.started = {}          # index -> start time
        self.quick_deaths = 0
        self.stopping = False

    def _say(self, msg):
        print(f'kbloop supervisor: {msg}', file=self.log, flush=True)

    def _start(self, index):
        self.procs[index] = self.start_worker(index)
        self.started[index] = time.monotonic()

    def _on_signal(self, signum, frame):
        self.stopping = True

    def run(self):
        """Run until SIGINT/SIGTERM (returns 0) or until workers keep failing (returns 1)."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            for i in range(self.workers):
                self._start(i)
            self._say(f'{self.workers} workers started: '
                      + ', '.join(f'#{i} pid {p.pid}' for i, p in self.procs.items()))
            while not self.stopping:
                for i, proc in list(self.procs.items()):
                    code = proc.poll()
                    if code is None or self.stopping:
                        continue
                    uptime = time.monotonic() - self.started[i]
                    self._say(f'worker #{i} (pid {proc.pid}) exited with code {code} '
                              f'after {uptime:.1f} s; restarting it')
                    if uptime < MIN_UPTIME:
                        self.quick_deaths += 1
                        if self.quick_deaths >= MAX_QUICK_DEATHS:
                            self._say('workers keep dying right after start; giving up')
                            return 1
                    self._start(i)
                time.sleep(0.05)
            return 0
        finally:
            self._stop_all()
            for s, handler in old.items():
                signal.signal(s, handler)

    def _stop_all(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + GRACE_SECONDS
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._say(f'worker pid {proc.pid} ignored SIGTERM; killing it')
                proc.kill()
                proc.wait()
        self._say('all workers stopped')


def run_command(argv, workers, cpus=None):
    """Run `workers` copies of a command line (python -m kbloop --workers N ...)."""
    cpus = default_cpus(workers) if cpus is None else list(cpus)
    return Supervisor(
        lambda i: subprocess.Popen(argv, env=worker_env(i, workers, cpus)), workers).run()


def serve(main, *, workers, cpus=None, **loop_options):
    """Run the coroutine function `main` in `workers` forked processes, one kbloop loop each.

    Call it from the main module before any loop exists.  Returns the supervisor's exit status
    (0 after SIGINT/SIGTERM)."""
    if not callable(main):
        raise TypeError('serve() needs a coroutine function (each worker calls it), '
                        f'not {type(main).__name__}')
    cpus = default_cpus(workers) if cpus is None else list(cpus)

    def start_worker(index):
        pid = os.fork()
        if pid:
            return _ForkedWorker(pid)
        status = 0
        try:                                # the worker process
            import kbloop
            os.environ.update(worker_env(index, workers, cpus))
            kbloop._apply_worker_env()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            kbloop.run(main(), **loop_options)
        except KeyboardInterrupt:
            pass
        except BaseException:
            import traceback
            traceback.print_exc()
            status = 1
        finally:
            os._exit(status)

    return Supervisor(start_worker, workers).run()


class _ForkedWorker:
    """The Popen-like handle of a forked worker."""

    def __init__(self, pid):
        self.pid = pid
        self.returncode = None

    def poll(self):
        if self.returncode is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def send_signal(self, sig):
        if self.poll() is None:
            os.kill(self.pid, sig)

    def kill(self):
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() >= deadline:
                raise subprocess.TimeoutExpired('worker', timeout)
            time.sleep(0.02)
        return self.returncode
