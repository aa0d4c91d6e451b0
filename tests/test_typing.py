"""kbloop's types (PEP 561): py.typed and stubs for the public API, kept in step with the
runtime, and mypy over a small user program sees kbloop's real types, not Any."""
import ast
import inspect
import os
import subprocess
import sys
import sysconfig
import textwrap

import pytest

import kbloop
import kbloop_ext.core

KBLOOP_DIR = os.path.dirname(os.path.abspath(kbloop.__file__))
KBLOOP_EXT_DIR = os.path.dirname(os.path.abspath(kbloop_ext.core.__file__))
ROOT = os.path.dirname(KBLOOP_DIR)
SITE = {os.path.realpath(sysconfig.get_paths()[k]) for k in ("purelib", "platlib")}
INSTALLED = os.path.realpath(ROOT) in SITE


def stub_functions(path):
    with open(path) as f:
        tree = ast.parse(f.read())
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, ast.FunctionDef):
                    found[f"{node.name}.{item.name}"] = item
        elif isinstance(node, ast.FunctionDef) and node in tree.body:
            found[node.name] = node
    return tree, found


def keywords(fn):
    return [a.arg for a in fn.args.kwonlyargs]


INIT_STUB = os.path.join(KBLOOP_DIR, "__init__.pyi")


def test_py_typed_and_stubs_ship_with_the_packages():
    for d in (KBLOOP_DIR, KBLOOP_EXT_DIR):
        assert os.path.exists(os.path.join(d, "py.typed")), d
    assert os.path.exists(INIT_STUB)
    assert os.path.exists(os.path.join(KBLOOP_EXT_DIR, "core.pyi"))


def test_installed_wheel_is_what_runs():
    """scripts/wheels.sh --test runs the core suite against the installed wheel: there, kbloop
    and its compiled core must come from site-packages, not from a source tree."""
    if not os.environ.get("KBLOOP_TEST_INSTALLED"):
        assert not INSTALLED or os.path.exists(os.path.join(ROOT, "kbloop", "py.typed"))
        return
    assert INSTALLED, f"kbloop imported from {ROOT}, not from {SITE}"
    assert os.path.realpath(KBLOOP_EXT_DIR).startswith(os.path.realpath(ROOT) + os.sep)
    assert not os.path.exists(os.path.join(ROOT, "setup.py"))


def test_stub_signatures_match_the_runtime():
    tree, fns = stub_functions(INIT_STUB)
    loop_kw = list(inspect.signature(kbloop.Loop.__init__).parameters)[1:]
    assert keywords(fns["Loop.__init__"]) == loop_kw
    # new_event_loop(*, backend=None, **options) passes every Loop option on.
    assert sorted(keywords(fns["new_event_loop"])) == sorted(loop_kw)
    assert sorted(keywords(fns["run"])) == sorted(["debug"] + loop_kw)
    # serve() pins each worker to its own cpu: every other Loop option.
    assert sorted(keywords(fns["serve"])) == sorted(
        ["workers", "cpus"] + [k for k in loop_kw if k != "cpu"])
    stub_all = next(ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                    and getattr(n.targets[0], "id", None) == "__all__")
    assert stub_all == kbloop.__all__
    for name in kbloop.__all__ + ["info", "format_stats", "BACKENDS", "__version__"]:
        assert hasattr(kbloop, name)
    _, core_fns = stub_functions(os.path.join(KBLOOP_EXT_DIR, "core.pyi"))
    for qualname in core_fns:
        if "." in qualname:
            cls, _, meth = qualname.partition(".")
            if not meth.startswith("__"):
                assert hasattr(getattr(kbloop_ext.core, cls), meth), qualname
    for name in ("backend", "buffer_pool", "alloc_buffer", "stats"):
        assert hasattr(kbloop.Loop, name)


GOOD = '''
import asyncio
import kbloop

class Echo(kbloop.ZeroCopyProtocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def buffer_received(self, buf: kbloop.Buffer | bytes) -> None:
        # typeshed's Transport.write() takes bytes, bytearray or memoryview: a memoryview of
        # the Buffer is the same memory.
        self.transport.write(memoryview(buf))

async def main() -> int:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(Echo, "127.0.0.1", 0)
    server.close()
    return 1

def run_it() -> int:
    n: int = kbloop.run(main(), ring_entries=256, busy_poll=False)
    loop = kbloop.Loop(recv_buffers=64, sqpoll=False)
    buf: kbloop.Buffer = loop.alloc_buffer(4096)
    data: bytes = buf.tobytes() + bytes(memoryview(buf))
    with buf:
        pass
    loop.close()
    usable: bool = kbloop.info()["io_uring"]["usable"]
    other = kbloop.new_event_loop(backend="io_uring", pool_limit_mb=64)
    other.close()
    try:
        kbloop.new_event_loop(backend="rdma", rdma_poll="sleep").close()
    except kbloop.BackendUnavailable as exc:
        print(exc)
    return n + len(data) + usable

reveal_type(kbloop.run)
'''

BAD = '''
import kbloop
loop = kbloop.new_event_loop(ring_entrys=256)
kbloop.Loop(backend="uring")
x: str = kbloop.run(kbloop.Loop().shutdown_asyncgens())
n: str = kbloop.info()["io_uring"]["usable"]
kbloop.serve(lambda: None, workers="2")
'''


def mypy(tmp_path, source):
    prog = tmp_path / "prog.py"
    prog.write_text(textwrap.dedent(source))
    env = dict(os.environ)
    if not INSTALLED:
        # A source tree or an editable install: mypy does not follow import hooks or
        # PYTHONPATH, so point it at the tree (never at site-packages: mypy refuses that).
        env["MYPYPATH"] = ROOT
    else:
        env.pop("MYPYPATH", None)
    return subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), str(prog)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=300)


def test_mypy_checks_a_typed_user_program(tmp_path):
    pytest.importorskip("mypy")
    r = mypy(tmp_path, GOOD)
    assert r.returncode == 0, r.stdout + r.stderr
    # kbloop.run is generic in the coroutine's result: not Any.
    assert 'Revealed type is "def [_T] (main: typing.Coroutine[Any, Any, _T' in r.stdout, r.stdout


def test_mypy_finds_misuse(tmp_path):
    pytest.importorskip("mypy")
    r = mypy(tmp_path, BAD)
    assert r.returncode == 1, r.stdout + r.stderr
    out = r.stdout
    assert 'Unexpected keyword argument "ring_entrys"' in out, out
    assert 'Argument "backend" to "Loop" has incompatible type' in out, out
    assert 'Incompatible types in assignment (expression has type "None", variable has type "str")' in out, out
    assert 'Incompatible types in assignment (expression has type "bool", variable has type "str")' in out, out
    assert 'Argument "workers" to "serve" has incompatible type "str"' in out, out
