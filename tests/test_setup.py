"""The set-up's logic in isolation: deb-src entries from the machine's own apt sources
(scripts/debsrc.py) and lwIP patched exactly once however often scripts/lwip.sh runs.
(scripts/test.sh runs the whole scripts/setup.sh a second time and checks it changes nothing.)"""
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPTS = os.path.join(os.path.dirname(HERE), "scripts")
if not os.path.exists(os.path.join(SCRIPTS, "debsrc.py")):
    pytest.skip("scripts/ is not beside tests/", allow_module_level=True)
sys.path.insert(0, SCRIPTS)
import debsrc  # noqa: E402


def write(root, rel, text):
    path = os.path.join(root, rel)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(textwrap.dedent(text))


def test_deb822_and_one_line_sources(tmp_path):
    write(tmp_path, "etc/os-release", 'ID=debian\nVERSION_CODENAME="bookworm"\n')
    # A local mirror in deb822, with an inline key, a disabled stanza and a third-party repo.
    write(tmp_path, "etc/apt/sources.list.d/debian.sources", """\
        # the local mirror
        Types: deb
        URIs: http://mirror.example.internal/debian
        Suites: bookworm bookworm-updates
        Components: main contrib
        Signed-By:
         -----BEGIN PGP PUBLIC KEY BLOCK-----
         .
         mQINBGPL
         -----END PGP PUBLIC KEY BLOCK-----

        Types: deb
        URIs: http://old.example.internal/debian
        Suites: bookworm
        Components: main
        Enabled: no

        Types: deb
        URIs: http://vendor.example.internal/repo
        Suites: nodistro
        Components: main
        """)
    write(tmp_path, "etc/apt/sources.list", """\
        deb [ arch=amd64 signed-by=/usr/share/keyrings/k.gpg ] http://sec.example.internal/debian-security bookworm-security main
        deb http://mirror.example.internal/debian bookworm main
        deb http://other.example.internal/debian bookworm contrib
        deb-src http://src.example.internal/debian trixie main
        """)
    assert debsrc.codename_of(str(tmp_path)) == "bookworm"
    stanzas = debsrc.deb_src_entries(debsrc.read_sources(str(tmp_path)), "bookworm")
    fields = [dict(line.split(": ", 1) for line in s.splitlines() if ": " in line) for s in stanzas]
    assert [(f["URIs"], f["Suites"]) for f in fields] == [
        ("http://sec.example.internal/debian-security", "bookworm-security"),
        ("http://mirror.example.internal/debian", "bookworm"),
        ("http://mirror.example.internal/debian", "bookworm-updates"),
    ]
    assert all(f["Types"] == "deb-src" and f["Components"] == "main" for f in fields)
    assert fields[0]["Signed-By"] == "/usr/share/keyrings/k.gpg"
    # One entry per archive and suite: the first configured (sources.list's, without a key).
    assert "Signed-By" not in fields[1]
    # The inline key is carried over whole, its continuation lines still indented.
    assert "Signed-By: \n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n mQINBGPL\n" in stanzas[2]
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "debsrc.py"), "--root",
                        str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "\n\n".join(stanzas)


def test_no_usable_source_is_a_clear_error(tmp_path):
    write(tmp_path, "etc/apt/sources.list", "deb http://x.example.internal/debian trixie main\n")
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "debsrc.py"), "--root",
                        str(tmp_path), "--codename", "bookworm"], capture_output=True, text=True)
    assert r.returncode == 1 and "no configured apt source for bookworm main" in r.stderr


def test_this_machines_sources_give_a_deb_src_entry():
    r = subprocess.run([sys.executable, os.path.join(SCRIPTS, "debsrc.py")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "Types: deb-src" in r.stdout and "Components: main" in r.stdout


PATCH_ONE = """\
--- a/src/core/tcp.c
+++ b/src/core/tcp.c
@@ -1,3 +1,3 @@
 a
-b
+B
 c
"""
# Touches the line the first patch changed: its reverse no longer applies once this one is in
# (what made the old set-up re-apply patches on a second run).
PATCH_TWO = """\
--- a/src/core/tcp.c
+++ b/src/core/tcp.c
@@ -1,3 +1,3 @@
 a
-B
+BB
 c
"""


@pytest.fixture
def tree(tmp_path):
    os.makedirs(tmp_path / "scripts")
    shutil.copy(os.path.join(SCRIPTS, "lwip.sh"), tmp_path / "scripts")
    write(tmp_path, ".deps/lwip.orig/src/core/tcp.c", "a\nb\nc\n")
    write(tmp_path, "kbloop_ext/dpdk/lwip/patches/0001-one.patch", PATCH_ONE)
    return tmp_path


def lwip_sh(tree):
    r = subprocess.run(["bash", str(tree / "scripts" / "lwip.sh")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def tcp_c(tree):
    return (tree / ".deps/lwip/src/core/tcp.c").read_text()


def test_lwip_patches_are_applied_once(tree):
    assert lwip_sh(tree) == "== lwIP: apply 0001-one.patch\n"
    assert tcp_c(tree) == "a\nB\nc\n"
    write(tree, "kbloop_ext/dpdk/lwip/patches/0002-two.patch", PATCH_TWO)
    out = lwip_sh(tree)
    assert out == "== lwIP: apply 0001-one.patch\n== lwIP: apply 0002-two.patch\n"
    assert tcp_c(tree) == "a\nBB\nc\n"
    for _ in range(2):
        assert lwip_sh(tree) == ""          # nothing to do, nothing re-applied
        assert tcp_c(tree) == "a\nBB\nc\n"
    assert (tree / ".deps/lwip.orig/src/core/tcp.c").read_text() == "a\nb\nc\n"


def test_a_changed_patch_is_applied_to_a_fresh_copy(tree):
    lwip_sh(tree)
    write(tree, "kbloop_ext/dpdk/lwip/patches/0001-one.patch", PATCH_ONE.replace("+B", "+X"))
    assert lwip_sh(tree) == "== lwIP: apply 0001-one.patch\n"
    assert tcp_c(tree) == "a\nX\nc\n"


def test_a_patch_that_does_not_apply_fails_and_keeps_the_old_tree(tree):
    lwip_sh(tree)
    write(tree, "kbloop_ext/dpdk/lwip/patches/0002-bad.patch", PATCH_TWO.replace("-B", "-Q"))
    r = subprocess.run(["bash", str(tree / "scripts" / "lwip.sh")], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode != 0
    assert tcp_c(tree) == "a\nB\nc\n"
