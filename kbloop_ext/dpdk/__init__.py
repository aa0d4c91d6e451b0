"""The DPDK datapath: DPDK's poll-mode drivers with lwIP as the TCP/IP stack (docs/dpdk.md).

kbloop_ext.dpdk.stack is built only where DPDK and lwIP's source were present at build time;
`available()` says whether it was, and why not.
"""


def available():
    """(True, "") when the DPDK device layer is built, else (False, why)."""
    try:
        from . import stack  # noqa: F401
    except ImportError as exc:
        return False, f"kbloop was built without DPDK ({exc}); see docs/dpdk.md"
    return True, ""
