"""Helpers for tests that start Python subprocesses (the CLI, fallbacks, uvicorn)."""
import os

import kbloop

KBLOOP_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(kbloop.__file__)))


def subprocess_env(**extra):
    """The environment for a child Python that must import this checkout's kbloop, without
    an io_uring failure forced on this process leaking into it."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (KBLOOP_ROOT, env.get("PYTHONPATH")) if p)
    env.pop("KBLOOP_FORCE_URING_ERROR", None)
    env.update(extra)
    return env
