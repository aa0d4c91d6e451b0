"""What the DPDK test modules share: whether they can run here, the virtual devices they use,
and the fixtures for a veth pair and for children left behind by a failing test."""

import os

import pytest

import childproc
import netns
from kbloop_ext import dpdk

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

built, why_not_built = dpdk.available()
ns_ok, why_no_ns = netns.available()
if not built and os.environ.get("CI"):
    # CI installs DPDK and lwIP's source (scripts/setup.sh): a missing build is a failure there.
    raise RuntimeError(f"CI without the DPDK datapath: {why_not_built}")
PYTESTMARK = [pytest.mark.skipif(not built, reason=why_not_built),
              pytest.mark.skipif(not ns_ok, reason=why_no_ns)]

# Both ends of the veth pair of tests/netns.py: the DPDK side owns vA.
VDEVS = {
    "af_packet": "net_af_packet0,iface=vA",
    "af_xdp": "net_af_xdp0,iface=vA,start_queue=0,queue_count=1",
}


@pytest.fixture(autouse=True)
def _kill_leftover_children():
    """A test that fails (or times out) before stopping its busy-polling children must not
    leave them running: kill them, and clean up their EAL runtime files."""
    yield
    childproc.kill_leftovers()


@pytest.fixture
def net():
    with netns.VethPair() as pair:
        yield pair
