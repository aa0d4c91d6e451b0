"""Real RDMA verbs for tests: soft-RoCE (rdma_rxe) inside a QEMU guest.

This host's kernel has no RDMA support, so the commands run in a guest booted from Debian's
stock 6.1 kernel, whose rdma_rxe module runs the real RoCE protocol engine.  The guest has no
disk: a tiny initramfs (busybox + the modules) mounts the host's `/` read-only over virtio-9p
and chroots into it, so everything installed on the host (rdma-core, perftest, this Python,
its venv, the extensions built in the repository) runs in the guest unchanged.  The repository
is mounted read-write at its own path.  See docs/rdma.md and ../shared/notes/rdma_softroce_vm.md.

    status, output = run_guest("ibv_devices")           # rxe0 on dummy0, 10.99.0.1/24
    server, client = run_pair("rping -s -a 10.99.1.1 -C 3", "rping -c -a 10.99.1.1 -C 3")

    python tests/rdma_vm.py -- ibv_devices               # the same from a shell

Everything built (kernel, initramfs) is cached under <repo>/.deps/rdma-vm/.
"""

import argparse
import codecs
import contextlib
import ctypes
import fcntl
import glob
import hashlib
import json
import lzma
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CACHE = os.path.join(REPO, ".deps", "rdma-vm")

PACKAGES = ["qemu-system-x86", "busybox-static", "kmod", "cpio", "iproute2", "rdma-core",
            "ibverbs-providers", "ibverbs-utils", "rdmacm-utils", "perftest", "libibverbs-dev",
            "librdmacm-dev"]
QEMU = "qemu-system-x86_64"

# What the guest loads, in dependency order once resolved.  crc32_generic is not a dependency
# of rdma_rxe, but rxe needs the crc32 crypto for the RoCE ICRC: without it `rdma link add`
# fails with "No such file or directory".
MODULES = ["crc32_generic", "rdma_rxe", "ib_uverbs", "rdma_ucm", "9p", "9pnet_virtio",
           "virtio_pci", "dummy", "virtio_net"]

# Single guest: rxe on a dummy netdev (rdma_cm cannot use 127.0.0.1).  Pair: rxe on virtio-net.
ADDR = "10.99.0.1"
PAIR_ADDRS = ("10.99.1.1", "10.99.1.2")

# panic=-1: a panicking guest reboots, which -no-reboot turns into QEMU's exit.
# The rest skips boot work that is slow when emulated: clock checks, probing for a PS/2
# keyboard, the crypto self-tests (~0.5 s).
KERNEL_ARGS = ("console=ttyS0 quiet panic=-1 tsc=reliable no_timer_check i8042.noaux "
               "i8042.nokbd cryptomgr.notests")

# One vCPU: emulated SMP costs more than it gives.  Measured here, a boot took 3.3 s with one
# and 6.5 s with two, and the checks of tests/test_rdma_vm.py (client and server in one
# guest) 11 s against 19-26 s.
SMP = 1

# PID 1 of the guest.  Its hash names the initramfs, so editing it rebuilds the image.
# kb_repo and kb_run come from the kernel command line (unknown key=value become init's env).
INIT = r"""#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
while read -r ko; do
    insmod "/lib/modules/$ko" || echo "kbvm: insmod $ko failed"
done </lib/modules/order
p9="trans=virtio,version=9p2000.L,msize=512000"
mkdir -p /host
# The host's files do not change under a test: cache them (imports stat a lot under emulation).
mount -t 9p -o "$p9,ro,cache=loose" host /host || echo "kbvm: cannot mount the host's /"
for d in tmp run var/tmp var/log; do mount -t tmpfs tmpfs "/host/$d"; done
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs tmpfs /host/dev/shm
mount -t devpts devpts /host/dev/pts
# After the tmpfs mounts: the repository or the run folder may live under /tmp.
mkdir -p "/host$kb_repo" "/host$kb_run"
mount -t 9p -o "$p9" repo "/host$kb_repo" || echo "kbvm: cannot mount $kb_repo"
mount -t 9p -o "$p9" run "/host$kb_run" || echo "kbvm: cannot mount $kb_run"
if [ -n "$kb_venv" ]; then
    mkdir -p "/host$kb_venv"
    mount -t 9p -o "$p9,ro,cache=loose" venv "/host$kb_venv" || echo "kbvm: cannot mount $kb_venv"
fi
chroot /host /bin/sh "$kb_run/job.sh"
sync
poweroff -f
"""

# The per-run script, run in the chroot.  The command's status goes to <run>/status only when
# the guest's network came up, so a missing status means the harness (not the command) failed.
JOB = r"""#!/bin/sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
run={run}
(
set -ex
busybox ip link set lo up
{net}
rdma link add rxe0 type rxe netdev {netdev}
# The RoCE v2 GID of our IPv4 address (rxe lists a v1 and a v2 one): tools take its index.
# (`read`, not cat: each exec costs under emulation; the table has 1024 slots.)
port=/sys/class/infiniband/rxe0/ports/1
for i in 0 1 2 3 4 5 6 7; do
    read -r gid <$port/gids/$i
    case $gid in 0000:0000:0000:0000:0000:ffff:*)
        read -r type <$port/gid_attrs/types/$i
        [ "$type" = "RoCE v2" ] && echo $i >$run/gid && break;;
    esac
done
test -s $run/gid
) >$run/setup.log 2>&1
# Not `( ... ) || exit`: that context would switch off the subshell's `set -e`.
[ $? = 0 ] || exit 1
: >$run/ready
{env}
read -r RXE_GID <$run/gid
export RXE_GID
cd {cwd} || exit 1
sh -c {cmd} >$run/output 2>&1 </dev/null
echo $? >$run/status
"""

# Busybox's static `ip` (busybox-static's /bin/busybox): iproute2's loads six libraries over 9p.
NET_DUMMY = """busybox ip link show dummy0 >/dev/null || busybox ip link add dummy0 type dummy
busybox ip addr add {addr}/24 dev dummy0
busybox ip link set dummy0 up"""

NET_VIRTIO = """busybox ip addr add {addr}/24 dev eth0
busybox ip link set eth0 up"""

# The guest's tmpfs folders hide the host's: a virtualenv under one of them (CI may make it
# in /tmp) gets a share of its own, so that sys.executable runs in the guest.
TMPFS_DIRS = ("/tmp", "/run", "/var/tmp", "/var/log")


def _hidden_venv():
    prefix = os.path.realpath(sys.prefix)
    if any(prefix == d or prefix.startswith(d + "/") for d in TMPFS_DIRS) and \
            not prefix.startswith(os.path.realpath(REPO) + "/"):
        return prefix
    return None


# Host variables that make no sense in the guest.
ENV_SKIP = {"PWD", "OLDPWD", "SHLVL", "_", "TMPDIR"}


class GuestError(RuntimeError):
    """The guest itself failed (crashed, could not set up rxe, timed out): not the command."""

    def __init__(self, message, console=""):
        tail = "\n".join(console.splitlines()[-40:])
        super().__init__(f"{message}\n--- guest console (tail) ---\n{tail}" if tail else message)
        self.console = console


class GuestTimeout(GuestError):
    pass


class Result(tuple):
    """(status, output) of a guest's command; also .console, .boot_s (until rxe0 was up),
    .total_s, and .killed (then status is None)."""

    def __new__(cls, status, output, **extra):
        self = super().__new__(cls, (status, output))
        self.__dict__.update(extra)
        return self

    status = property(lambda self: self[0])
    output = property(lambda self: self[1])


# ---------------------------------------------------------------------------------------------
# Installation and the cached kernel/initramfs

def _missing_packages():
    r = subprocess.run(["dpkg-query", "-W", "-f=${Package} ${Status}\n"] + PACKAGES,
                       capture_output=True, text=True)       # unknown ones: exit 1, not listed
    installed = {line.split()[0] for line in r.stdout.splitlines()
                 if line.endswith(" installed") and " ok installed" in line}
    return [pkg for pkg in PACKAGES if pkg not in installed]


def available():
    """(True, "") when guests can run here (possibly after ensure_installed() and prepare()),
    else (False, why).  Never False merely because nothing is installed or built yet."""
    if os.uname().machine != "x86_64":
        return False, "the RDMA test guest is x86_64 only"
    if not shutil.which("dpkg-query") or not shutil.which("apt-get"):
        return False, "the RDMA test guest is built from Debian packages (no apt here)"
    missing = _missing_packages()
    if missing and os.geteuid() != 0:
        return False, f"not root and missing packages: {' '.join(missing)}"
    return True, ""


def _sh(args, **kw):
    """Run a command; its output, or a RuntimeError that shows it."""
    r = subprocess.run(args, capture_output=True, text=True, **kw)
    if r.returncode != 0:
        raise RuntimeError(f"{shlex.join(args)} failed ({r.returncode}):\n{r.stdout}{r.stderr}")
    return r.stdout


def _apt(*args, **kw):
    """apt-get, once more after an `apt-get update` if it fails (a fresh machine has no
    package lists; stale ones name versions the archive no longer has)."""
    cmd = ["apt-get", "-q", "-o", "DPkg::Lock::Timeout=900", *args]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        return _sh(cmd, env=env, **kw)
    except RuntimeError:
        if os.geteuid() != 0:
            raise
        _sh(["apt-get", "-q", "update"], env=env)
        return _sh(cmd, env=env, **kw)


def ensure_installed():
    """apt-get install what the guest needs, if anything is missing (quick when nothing is)."""
    missing = _missing_packages()
    if not missing:
        return
    if os.geteuid() != 0:
        raise RuntimeError(f"as root: apt-get install {' '.join(missing)}")
    _apt("install", "-y", "--no-install-recommends", *missing)


def _kernel_package():
    """The linux-image-6.1.0-NN-amd64 that Debian's linux-image-amd64 currently names."""
    for attempt in (1, 2):
        r = subprocess.run(["apt-cache", "depends", "linux-image-amd64"], capture_output=True,
                           text=True)
        m = re.search(r"Depends: (linux-image-[0-9]\S*-amd64)\b", r.stdout)
        if m:
            return m.group(1)
        if attempt == 1 and os.geteuid() == 0:
            _sh(["apt-get", "-q", "update"])       # a fresh machine has no package lists
    raise RuntimeError(f"apt-cache names no kernel for linux-image-amd64:\n{r.stdout}{r.stderr}")


def _extract_vmlinux(bzimage, dest):
    """The uncompressed ELF kernel out of a bzImage: QEMU boots it through its PVH entry,
    which skips ~4 s of emulated decompression per boot."""
    with open(bzimage, "rb") as f:
        data = f.read()
    start = data.find(b"\xfd7zXZ\x00")
    if start < 0:
        raise RuntimeError(f"{bzimage}: no XZ payload (not a Debian amd64 kernel?)")
    elf = lzma.LZMADecompressor(lzma.FORMAT_XZ).decompress(data[start:])
    if elf[:4] != b"\x7fELF":
        raise RuntimeError(f"{bzimage}: the XZ payload is not an ELF kernel")
    with open(dest + ".tmp", "wb") as f:
        f.write(elf)
    os.replace(dest + ".tmp", dest)


def _fetch_kernel(kdir):
    """kdir/vmlinux and kdir/modules/ (the MODULES and their dependencies, with an `order`
    file) from the kernel's .deb.  The 400 MB unpacked tree is not kept."""
    pkg = os.path.basename(kdir)
    kver = pkg[len("linux-image-"):]
    work = tempfile.mkdtemp(prefix="fetch-", dir=CACHE)
    try:
        # As root, apt's sandbox user could not write our folder.
        sandbox = ["-o", "APT::Sandbox::User=root"] if os.geteuid() == 0 else []
        _apt(*sandbox, "download", pkg, cwd=work)
        deb, = glob.glob(os.path.join(work, "*.deb"))
        tree = os.path.join(work, "root")
        _sh(["dpkg-deb", "-x", deb, tree])
        _sh(["depmod", "-b", tree, kver])      # the .deb has no modules.dep
        order = []
        for mod in MODULES:
            out = _sh(["modprobe", "-d", tree, "-S", kver, "--show-depends", mod])
            for line in out.splitlines():
                if line.startswith("insmod ") and line.split()[1] not in order:
                    order.append(line.split()[1])      # its options dropped: defaults wanted
        new = kdir + ".tmp"
        shutil.rmtree(new, ignore_errors=True)
        os.makedirs(os.path.join(new, "modules"))
        for ko in order:
            shutil.copy(ko, os.path.join(new, "modules"))
        with open(os.path.join(new, "modules", "order"), "w") as f:
            f.write("".join(os.path.basename(ko) + "\n" for ko in order))
        with open(os.path.join(new, "modules.list"), "w") as f:
            f.write(" ".join(MODULES))
        _extract_vmlinux(os.path.join(tree, "boot", f"vmlinuz-{kver}"),
                         os.path.join(new, "vmlinux"))
        shutil.rmtree(kdir, ignore_errors=True)
        os.replace(new, kdir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _build_initramfs(kdir, dest):
    stage = tempfile.mkdtemp(prefix="initramfs-", dir=CACHE)
    try:
        for d in ("bin", "proc", "sys", "dev", "lib"):
            os.makedirs(os.path.join(stage, d))
        shutil.copy("/bin/busybox", os.path.join(stage, "bin", "busybox"))
        shutil.copytree(os.path.join(kdir, "modules"), os.path.join(stage, "lib", "modules"))
        with open(os.path.join(stage, "init"), "w") as f:
            f.write(INIT)
        os.chmod(os.path.join(stage, "init"), 0o755)
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=stage, check=True,
                               capture_output=True).stdout
        # Uncompressed: decompressing it would cost more emulated time than reading it.
        with open(dest + ".tmp", "wb") as f:
            subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=stage,
                           input=names, stdout=f, check=True)
        os.replace(dest + ".tmp", dest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _read_text(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return None


def prepare():
    """Install the packages if needed, build (or find cached) the guest's kernel and
    initramfs; returns (vmlinux, initramfs).  The kernel fetched first stays in use (a later
    apt update does not force a download) until MODULES changes."""
    ensure_installed()
    os.makedirs(CACHE, exist_ok=True)
    with open(os.path.join(CACHE, ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)       # parallel test processes build it once
        kdirs = sorted(glob.glob(os.path.join(CACHE, "linux-image-*-amd64")))
        kdir = kdirs[-1] if kdirs else None
        if not kdir or _read_text(os.path.join(kdir, "modules.list")) != " ".join(MODULES):
            # Then the kernel apt names now (the archive may no longer have the cached one).
            kdir = os.path.join(CACHE, _kernel_package())
            _fetch_kernel(kdir)
            for old in kdirs:
                if old != kdir:
                    shutil.rmtree(old)
        digest = hashlib.sha256((INIT + " ".join(MODULES)).encode()).hexdigest()[:12]
        initramfs = os.path.join(kdir, f"initramfs-{digest}.cpio")
        if not os.path.exists(initramfs):
            for old in glob.glob(os.path.join(kdir, "initramfs-*.cpio")):
                os.unlink(old)
            _build_initramfs(kdir, initramfs)
        return os.path.join(kdir, "vmlinux"), initramfs


# ---------------------------------------------------------------------------------------------
# Running guests

def _guest_env(env):
    """The host's environment for the command, with this interpreter's bin folder (a venv's or
    pyenv's real one) first on PATH: a pyenv shim costs ~6 s per call under emulation."""
    merged = {k: v for k, v in os.environ.items() if k not in ENV_SKIP}
    bindir = os.path.dirname(sys.executable)
    merged["PATH"] = bindir + os.pathsep + merged.get("PATH", "/usr/bin:/bin")
    merged.update(env or {})
    return merged


def _die_with_parent():
    """In the QEMU child: a test process killed outright must not leave its guest running.
    (The signal comes when the thread that started the guest ends: start it from one that
    outlives it.)"""
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _free_udp_ports(n):
    socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class Guest:
    """One running guest.  start() returns at once; wait() returns its Result.  For tests of
    peer loss: kill() (the QEMU process dies, as a crashed machine) or set_link(False) (the
    cable is pulled; the guest keeps running)."""

    def __init__(self, cmd, *, env=None, net=None, cwd=REPO, smp=SMP, name="guest"):
        if any(c.isspace() for c in REPO + cwd):
            raise ValueError("the guest's kernel command line cannot carry paths with spaces")
        self.cmd, self.cwd, self.smp, self.name = cmd, cwd, smp, name
        self.env = _guest_env(env)
        self.net = net          # None, or (addr, local_port, peer_port, mac) for a pair
        self.run_dir = None
        self.proc = None
        self.started = None
        self.boot_s = None
        self.ended = None
        self.killed = False
        self._console = None
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")

    # Files the guest writes in the shared run folder.
    def _path(self, name):
        return os.path.join(self.run_dir, name)

    def _read(self, name):
        return _read_text(self._path(name))

    def start(self):
        vmlinux, initramfs = prepare()
        self.run_dir = tempfile.mkdtemp(prefix=f"kbloop-vm-{self.name}-")
        if self.net:
            net, netdev = NET_VIRTIO.format(addr=self.net[0]), "eth0"
        else:
            net, netdev = NET_DUMMY.format(addr=ADDR), "dummy0"
        exports = "\n".join(f"export {k}={shlex.quote(v)}" for k, v in self.env.items()
                            if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
        with open(self._path("job.sh"), "w") as f:
            f.write(JOB.format(run=shlex.quote(self.run_dir), net=net, netdev=netdev,
                               env=exports, cwd=shlex.quote(self.cwd),
                               cmd=shlex.quote(self.cmd)))
        share = "security_model=none,multidevs=remap"
        args = [QEMU, "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
                "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", str(self.smp), "-m", "1G",
                "-serial", "stdio",
                "-monitor", f"unix:{self._path('monitor')},server=on,wait=off",
                "-kernel", vmlinux, "-initrd", initramfs,
                "-append", f"{KERNEL_ARGS} kb_repo={REPO} kb_run={self.run_dir}",
                "-virtfs", f"local,path=/,mount_tag=host,readonly=on,{share}",
                "-virtfs", f"local,path={REPO},mount_tag=repo,{share}",
                "-virtfs", f"local,path={self.run_dir},mount_tag=run,{share}"]
        venv = _hidden_venv()
        if venv:
            args[args.index("-append") + 1] += f" kb_venv={venv}"
            args += ["-virtfs", f"local,path={venv},mount_tag=venv,readonly=on,{share}"]
        if self.net:
            _, local, peer, mac = self.net
            args += ["-netdev", f"socket,id=n0,udp=127.0.0.1:{peer},localaddr=127.0.0.1:{local}",
                     "-device", f"virtio-net-pci,netdev=n0,mac={mac}"]
        self._console = open(self._path("console.log"), "wb")
        self.started = time.monotonic()
        # QEMU is host tooling: not run under the ASan pass's preloaded libasan.
        qemu_env = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=self._console,
                                     stderr=subprocess.STDOUT, env=qemu_env,
                                     preexec_fn=_die_with_parent)
        return self

    @property
    def console(self):
        return self._read("console.log") or ""

    @property
    def output(self):
        """What the command has written so far (stdout and stderr)."""
        return self._read("output") or ""

    def _poll(self):
        now = time.monotonic()
        if self.boot_s is None and os.path.exists(self._path("ready")):
            self.boot_s = now - self.started
        status = self.proc.poll()
        if status is not None and self.ended is None:
            self.ended = now
        return status

    def wait_ready(self, timeout=60):
        """Wait until rxe0 is up and the command has started."""
        deadline = time.monotonic() + timeout
        while self._poll() is None and self.boot_s is None:
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self.name}: rxe0 not up in {timeout} s", self.console)
            time.sleep(0.05)
        if self.boot_s is None:
            raise GuestError(f"{self.name} ended before its command started", self.console)

    def wait_for_output(self, text, timeout=60):
        """Wait until the command has printed `text` (e.g. a server's "listening")."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if self._poll() is not None:
                raise GuestError(f"{self.name} ended before printing {text!r}", self.console)
            if time.monotonic() > deadline:
                raise GuestTimeout(f"{self.name}: no {text!r} in {timeout} s:\n{self.output}",
                                   self.console)
            time.sleep(0.05)

    def set_link(self, up):
        """Plug or pull the guest's virtio-net cable (QEMU's `set_link`)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(self._path("monitor"))
            s.sendall(f"set_link n0 {'on' if up else 'off'}\n".encode())
            # Done when the monitor prompts again (its banner ends in the first prompt).
            said = b""
            while said.count(b"(qemu)") < 2:
                chunk = s.recv(4096)
                if not chunk:
                    break
                said += chunk
            if b"rror" in said:
                raise GuestError(f"{self.name}: set_link failed: {said.decode(errors='replace')}")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.killed = True
            self.proc.kill()

    def wait(self, timeout=120, stream=None):
        """The Result once the guest has powered off.  Raises GuestTimeout (after killing it)
        or GuestError when the guest failed rather than the command.  `stream`: a text file
        that receives the command's output as it comes."""
        deadline = self.started + timeout
        shown = 0
        while self._poll() is None:
            if stream is not None:
                shown = self._stream(stream, shown)
            if time.monotonic() > deadline:
                self.kill()
                self.proc.wait()
                raise GuestTimeout(f"{self.name} did not finish in {timeout} s; its command's "
                                   f"output:\n{self.output}", self.console)
            time.sleep(0.05)
        total = self.ended - self.started
        if stream is not None:
            self._stream(stream, shown)
        output, console = self.output, self.console
        self.close()
        status = self._read_status()
        if status is None and not self.killed:
            setup = self._read("setup.log")
            ready = os.path.exists(self._path("ready"))
            why = ("could not set up rxe0:\n" + setup) if setup and not ready \
                else "crashed or powered off before its command ended"
            raise GuestError(f"{self.name} {why}", console)
        return Result(status, output, console=console, boot_s=self.boot_s, total_s=total,
                      killed=self.killed)

    def _stream(self, stream, offset):
        """Copy what the command wrote since `offset` to `stream`; returns the new offset."""
        try:
            with open(self._path("output"), "rb") as f:
                f.seek(offset)
                data = f.read()
        except FileNotFoundError:
            return offset
        stream.write(self._decoder.decode(data))     # a character may straddle two reads
        stream.flush()
        return offset + len(data)

    def _read_status(self):
        text = self._read("status")
        return int(text) if text and text.strip().isdigit() else None

    def close(self):
        self.kill()
        if self.proc:
            self.proc.wait()
        if self._console:
            self._console.close()

    def cleanup(self):
        self.close()
        if self.run_dir:
            shutil.rmtree(self.run_dir, ignore_errors=True)

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc):
        self.cleanup()


def run_guest(cmd, timeout=120, env=None, net=None, stream=None, smp=SMP):
    """Boot one guest with rxe0 on dummy0 (10.99.0.1/24), run the shell command `cmd` in the
    repository with the host's PATH and venv, power off.  Returns Result (status, output):
    the command's exit status and its stdout+stderr.  Raises GuestError/GuestTimeout when the
    guest (not the command) failed.  `net` is for run_pair's guests."""
    with Guest(cmd, env=env, net=net, smp=smp) as guest:
        return guest.wait(timeout, stream=stream)


@contextlib.contextmanager
def start_pair(server_cmd, client_cmd, env=None, smp=SMP):
    """Two running guests joined by a virtual cable (QEMU's UDP socket netdev on the host's
    loopback): (server at 10.99.1.1, client at 10.99.1.2), rxe0 on each one's eth0.  Both
    commands see VM_ROLE, VM_ADDR, VM_PEER and VM_SHARED (a folder both guests and the host
    share, to signal readiness, e.g. `touch $VM_SHARED/listening`).  Tests of loss kill() or
    set_link(False) one of them and wait() on the other."""
    shared = tempfile.mkdtemp(prefix="kbloop-vm-shared-")
    ports = _free_udp_ports(2)
    guests = []
    try:
        for i, (role, cmd) in enumerate((("server", server_cmd), ("client", client_cmd))):
            extra = {"VM_ROLE": role, "VM_ADDR": PAIR_ADDRS[i], "VM_PEER": PAIR_ADDRS[1 - i],
                     "VM_SHARED": shared, **(env or {})}
            net = (PAIR_ADDRS[i], ports[i], ports[1 - i], f"52:54:00:99:01:0{i + 1}")
            guests.append(Guest(cmd, env=extra, net=net, smp=smp, name=role).start())
        yield tuple(guests)
    finally:
        for g in guests:
            g.cleanup()
        shutil.rmtree(shared, ignore_errors=True)


def run_pair(server_cmd, client_cmd, timeout=120, env=None, kill_after=None):
    """Run both commands in two linked guests; returns (server Result, client Result).
    kill_after=(role, seconds): kill that guest's QEMU that long after the link came up
    (its Result then has killed=True, status None)."""
    with start_pair(server_cmd, client_cmd, env=env) as (server, client):
        if kill_after:
            role, delay = kill_after
            server.wait_ready(timeout)
            client.wait_ready(timeout)
            time.sleep(delay)
            (server if role == "server" else client).kill()
        return wait_all((server, client), timeout)


def wait_all(guests, timeout=120):
    """wait() for several guests, watching all of them at once (so each one's boot_s is
    when its own rxe0 came up)."""
    deadline = time.monotonic() + timeout
    while None in [g._poll() for g in guests] and time.monotonic() < deadline:
        time.sleep(0.05)
    return tuple(g.wait(timeout) for g in guests)      # each one's timeout counts from its start


# ---------------------------------------------------------------------------------------------

def run_checks(cmd, timeout):
    """Run a guest script that prints `RESULT <check> <json>` lines (the RDMA tests' way of
    doing many checks in one boot): (its Result, {check: decoded json})."""
    result = run_guest(cmd, timeout=timeout)
    found = {m.group(1): json.loads(m.group(2))
             for m in re.finditer(r"^RESULT (\w+) (.*)$", result.output, re.M)}
    print(f"guest: {result.total_s:.1f} s in all; output:\n{result.output}")
    return result, found


def check_result(checks, name):
    """One check of run_checks(): present, and without an "exception" entry."""
    result, found = checks
    assert name in found, f"no result {name}; guest output:\n{result.output}"
    r = found[name]
    assert "exception" not in r, r["exception"] + "\n" + result.output
    return r


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Run a command in a QEMU guest with soft-RoCE (rxe0).",
        usage="%(prog)s [options] -- CMD...  (one argument: a shell command; several: argv)")
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument("--server", metavar="CMD",
                        help="two guests: CMD runs on 10.99.1.1, the command on 10.99.1.2 "
                             "(both see VM_ADDR, VM_PEER)")
    parser.add_argument("--prepare", action="store_true",
                        help="only install the packages and build the cache")
    parser.add_argument("--console", action="store_true", help="print the guest's console too")
    parser.add_argument("cmd", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    ok, why = available()
    if not ok:
        sys.exit(f"rdma_vm: cannot run here: {why}")
    t0 = time.monotonic()
    prepare()
    if args.prepare or time.monotonic() - t0 > 1:
        print(f"rdma_vm: packages and cache ready in {time.monotonic() - t0:.1f} s",
              file=sys.stderr)
    if args.prepare:
        return 0
    if not cmd:
        parser.error("no command")
    shell = cmd[0] if len(cmd) == 1 else shlex.join(cmd)
    try:
        if args.server:
            results = list(zip(("server", "client"),
                               run_pair(args.server, shell, timeout=args.timeout)))
        else:
            results = [("guest", run_guest(shell, timeout=args.timeout, stream=sys.stdout))]
    except GuestError as exc:
        sys.exit(f"rdma_vm: {exc}")
    for name, r in results:
        if args.server:
            print(f"--- {name} (status {r.status}) ---\n{r.output}", end="")
        if args.console:
            print(f"--- {name}'s console ---\n{r.console}", end="")
        sys.stdout.flush()
        print(f"rdma_vm: {name}: status {r.status}, rxe0 up after {r.boot_s:.1f} s, "
              f"{r.total_s:.1f} s in all", file=sys.stderr)
    # The command's status; with --server, the client's, or the server's if that one is 0.
    return next((r.status for _, r in reversed(results) if r.status), 0)


if __name__ == "__main__":
    sys.exit(main())
