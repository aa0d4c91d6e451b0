"""The package as users get it: the sdist holds everything a build needs, the wheel built from
it is repaired by auditwheel into a self-contained manylinux wheel (liburing linked in, no
DPDK/RDMA layers), and the core suite passes against that wheel installed in a fresh venv
(scripts/wheels.sh --test, for this interpreter; scripts/test.sh does the other Pythons).
A build without liburing stops with the Debian package to install."""
import ast
import email.parser
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
DIST = os.path.join(REPO, "dist")
TAG = f"cp{sys.version_info[0]}{sys.version_info[1]}"

if not os.path.exists(os.path.join(REPO, "scripts", "wheels.sh")):
    pytest.skip("not a source tree", allow_module_level=True)

# Building a wheel and running the core suite against it takes minutes (tox.ini's 300 s is per
# test, the fixture's set-up included).
pytestmark = pytest.mark.timeout(1800)


def version():
    with open(os.path.join(REPO, "kbloop", "__init__.py")) as f:
        for node in ast.parse(f.read()).body:
            if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "__version__":
                return node.value.value
    raise AssertionError("no __version__ in kbloop/__init__.py")


@pytest.fixture(scope="module")
def built():
    """scripts/wheels.sh --test for this interpreter: sdist, wheel, repair, fresh venv, suite."""
    for name in os.listdir(DIST) if os.path.isdir(DIST) else []:
        if name.endswith(".tar.gz") or f"-{TAG}-" in name:
            os.remove(os.path.join(DIST, name))
    r = subprocess.run(["bash", os.path.join(REPO, "scripts", "wheels.sh"), "--test",
                        sys.executable], capture_output=True, text=True, timeout=1500,
                       cwd=REPO)
    return r


def test_wheel_built_repaired_and_core_suite_passes_installed(built):
    out = built.stdout + built.stderr
    assert built.returncode == 0, out[-6000:]
    # auditwheel show: a manylinux tag, nothing grafted (liburing is linked in statically).
    shown = [l for l in built.stdout.splitlines() if "is consistent with" in l]
    assert len(shown) == 1 and "manylinux" in shown[0], out[-3000:]
    # The core suite ran against the installed wheel and passed (pytest's closing line).
    summary = [l for l in built.stdout.splitlines() if re.search(r"\d+ passed", l)]
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], out[-3000:]
    assert int(re.search(r"(\d+) passed", summary[-1]).group(1)) > 500


def wheel_path():
    wheels = [n for n in os.listdir(DIST) if n.endswith(".whl") and f"-{TAG}-" in n]
    assert len(wheels) == 1, wheels
    return os.path.join(DIST, wheels[0])


def test_wheel_contents_and_metadata(built):
    assert built.returncode == 0
    path = wheel_path()
    assert re.search(rf"kbloop-{re.escape(version())}-{TAG}-{TAG}-manylinux.*_x86_64\.whl$", path)
    with zipfile.ZipFile(path) as whl:
        names = whl.namelist()
        meta = email.parser.Parser().parsestr(
            whl.read(f"kbloop-{version()}.dist-info/METADATA").decode())
        core = [n for n in names if re.match(r"kbloop_ext/core\..*\.so$", n)]
        assert len(core) == 1, names
        so = whl.read(core[0])
    for name in ("kbloop/__init__.py", "kbloop/__main__.py", "kbloop/py.typed",
                 "kbloop/__init__.pyi", "kbloop_ext/py.typed", "kbloop_ext/core.pyi",
                 f"kbloop-{version()}.dist-info/licenses/LICENSE"):
        assert name in names, name
    # The DPDK and RDMA device layers are not in the default wheel, nor grafted libraries.
    assert not [n for n in names if re.search(r"(stack|verbs)\..*\.so$|\.libs/", n)], names
    assert not [n for n in names if n.endswith((".pyx", ".pxi", ".c"))]
    assert meta["Name"] == "kbloop" and meta["Version"] == version()
    assert meta["License-Expression"] == "MIT"
    assert meta["Requires-Python"] == ">=3.11"
    for v in ("3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {v}" in meta.get_all("Classifier")
    # No shared liburing (nor libibverbs/librdmacm) needed at run time.
    tmp = os.path.join(DIST, "raw", "core-check.so")
    with open(tmp, "wb") as f:
        f.write(so)
    needed = subprocess.run(["readelf", "-d", tmp], capture_output=True, text=True).stdout
    os.remove(tmp)
    libs = re.findall(r"\(NEEDED\).*\[(.*)\]", needed)
    assert not [l for l in libs if re.match(r"lib(uring|ibverbs|rdmacm|rte_)", l)], libs


def test_sdist_holds_everything_a_build_needs(built):
    assert built.returncode == 0
    sdist = os.path.join(DIST, f"kbloop-{version()}.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True,
                             text=True).stdout.split()
    if not tracked:
        pytest.fail("git ls-files found nothing: run from a clone")
    needed = [f for f in tracked if f.startswith("kbloop_ext/") and f.endswith(
        (".pyx", ".pxi", ".pxd", ".pyi", ".h", ".c", ".patch", ".py", "py.typed"))]
    needed += [f for f in tracked if f.startswith("kbloop/")]
    needed += ["LICENSE", "README.md", "pyproject.toml", "setup.py", "MANIFEST.in"]
    missing = [f for f in needed if f not in names]
    assert not missing, missing
    # Cython's generated C files are made again by the build, never shipped stale.
    assert not {"kbloop_ext/core.c", "kbloop_ext/dpdk/stack.c", "kbloop_ext/rdma/verbs.c"} & names
    assert not [n for n in names if n.endswith(".so")]


def test_build_without_liburing_names_the_debian_package(tmp_path):
    """/usr/include hidden in a private mount namespace: no liburing.h to be found."""
    if os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.fail("needs root and unshare (CI runs as root)")
    cmd = (f"mount -t tmpfs none /usr/include && cd {REPO} && "
           f"{sys.executable} setup.py -q build_ext --build-temp {tmp_path}/t "
           f"--build-lib {tmp_path}/l")
    r = subprocess.run(["unshare", "-m", "sh", "-c", cmd], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, KBLOOP_DPDK="0", KBLOOP_RDMA="0"))
    assert r.returncode != 0
    assert "liburing.h not found" in r.stderr and "apt-get install liburing-dev" in r.stderr, \
        r.stderr[-2000:]
    assert "No such file" not in r.stderr            # not a raw compiler error
