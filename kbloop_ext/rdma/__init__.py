"""The RDMA datapath: byte streams over RC queue pairs (libibverbs, rdma_cm); docs/rdma.md.

kbloop_ext.rdma.verbs is built only where libibverbs and librdmacm were present at build time;
`available()` says whether it was, and why not.
"""


def available():
    """(True, "") when the RDMA device layer is built, else (False, why)."""
    try:
        from . import verbs  # noqa: F401
    except ImportError as exc:
        return False, f"kbloop was built without RDMA ({exc}); see docs/rdma.md"
    return True, ""
