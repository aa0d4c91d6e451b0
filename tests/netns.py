"""Network namespaces joined by a veth pair, for the DPDK datapath's tests.

    with VethPair() as net:
        net.run_a(["python", ...])     # in namespace A, where the DPDK side owns vA
        net.run_b(["ping", ...])       # in namespace B: the Linux kernel's stack, NET.ip_b on vB

Only namespaces created here are touched, and they are deleted on exit.  The kernel side's
checksum and segmentation offloads are switched off: a user-space stack on veth otherwise
receives frames with unfilled TCP checksums and GSO super-frames (../shared/notes/dpdk_lwip.md).
"""

import itertools
import os
import shutil
import subprocess

_counter = itertools.count()


def available():
    """(True, "") where namespaces can be made here, else (False, why)."""
    if os.geteuid() != 0:
        return False, "network namespaces need root"
    for tool in ("ip", "ethtool"):
        if not shutil.which(tool):
            return False, f"`{tool}` is not installed (bash scripts/setup.sh installs it)"
    return True, ""


def sh(*args, check=True, **kw):
    return subprocess.run(list(args), check=check, capture_output=True, text=True, **kw)


class VethPair:
    ip_a = "10.200.0.1"     # the DPDK stack's address (in user space, not on vA)
    ip_b = "10.200.0.2"     # the kernel's address on vB
    prefix = 24

    def __init__(self):
        tag = f"{os.getpid() % 100000}{next(_counter)}"
        self.ns_a, self.ns_b = f"kbA{tag}", f"kbB{tag}"
        self.if_a, self.if_b = "vA", "vB"

    def __enter__(self):
        try:
            sh("ip", "netns", "add", self.ns_a)
            sh("ip", "netns", "add", self.ns_b)
            sh("ip", "link", "add", self.if_a, "netns", self.ns_a, "type", "veth",
               "peer", "name", self.if_b, "netns", self.ns_b)
            for ns, dev in ((self.ns_a, self.if_a), (self.ns_b, self.if_b)):
                sh("ip", "-n", ns, "link", "set", "lo", "up")
                sh("ip", "-n", ns, "link", "set", dev, "up")
            sh("ip", "-n", self.ns_b, "addr", "add", f"{self.ip_b}/{self.prefix}", "dev", self.if_b)
            self.in_b("ethtool", "-K", self.if_b, "tx", "off", "tso", "off", "gso", "off")
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc):
        for ns in (self.ns_a, self.ns_b):
            sh("ip", "netns", "del", ns, check=False)

    def mac_a(self):
        out = sh("ip", "-n", self.ns_a, "-o", "link", "show", self.if_a).stdout
        return out.split("link/ether", 1)[1].split()[0]

    def cmd_a(self, *args):
        return ["ip", "netns", "exec", self.ns_a, *args]

    def cmd_b(self, *args):
        return ["ip", "netns", "exec", self.ns_b, *args]

    def in_b(self, *args, check=True, **kw):
        return sh(*self.cmd_b(*args), check=check, **kw)
