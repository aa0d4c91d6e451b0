"""The RDMA test guest itself (tests/rdma_vm.py): soft-RoCE really works in it, the project's
Python runs in it, and a failing command is told apart from a failing guest.

Guest boots are the cost (~5 s each, emulated): the single-guest checks share one boot."""

import os
import re
import sys

import pytest

import rdma_vm

ok, why_not = rdma_vm.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"no RDMA test guest here: {why_not}")

# One guest runs every check below; each prints its section and `== <name> status N`.
# Servers and clients of a pair retry while the other side is not listening yet.
CHECKS = {
    "rdma_link": "rdma link show",
    "ibv_devices": "ibv_devices; ibv_devinfo -d rxe0 | grep -E 'state|link_layer'",
    "rc_pingpong": """
        ibv_rc_pingpong -d rxe0 -g $RXE_GID -n 50 >/tmp/server.log 2>&1 &
        server=$!
        for i in $(seq 30); do
            ibv_rc_pingpong -d rxe0 -g $RXE_GID -n 50 127.0.0.1 && break
            sleep 0.2
        done
        wait $server; s=$?; cat /tmp/server.log; exit $s""",
    "rping": """
        rping -s -a 10.99.0.1 -C 5 -v >/tmp/server.log 2>&1 &
        server=$!
        for i in $(seq 30); do rping -c -a 10.99.0.1 -C 5 -v && break; sleep 0.2; done
        wait $server; s=$?; cat /tmp/server.log; exit $s""",
    "ucmatose": """
        ucmatose -b 10.99.0.1 >/tmp/server.log 2>&1 &
        server=$!
        for i in $(seq 30); do ucmatose -s 10.99.0.1 && break; sleep 0.2; done
        wait $server; s=$?; cat /tmp/server.log; exit $s""",
    # The interpreter these tests run with, by its path, and `python3` on PATH (not a shim).
    "python": f"""
        command -v python3
        {sys.executable} -c '
import asyncio, sys, kbloop
print("executable", sys.executable)
print("kbloop", kbloop.__file__)
async def main():
    await asyncio.sleep(0.01)
    return "ran"
print("loop", kbloop.new_event_loop(backend="io_uring").run_until_complete(main()))
'""",
}


def _script():
    parts = []
    for name, cmd in CHECKS.items():
        parts.append(f"echo '== {name}'\n( {cmd}\n) 2>&1\necho \"== {name} status $?\"")
    return "\n".join(parts) + "\nexit 7\n"


@pytest.fixture(scope="module")
def one_guest():
    return rdma_vm.run_guest(_script(), timeout=150)


def section(result, name):
    """(status, output) of one check in the shared guest's output."""
    m = re.search(rf"^== {name}\n(.*?)^== {name} status (\d+)$", result.output, re.S | re.M)
    assert m, f"no section {name} in:\n{result.output}"
    return int(m.group(2)), m.group(1)


def test_exit_status_is_the_commands(one_guest):
    assert one_guest.status == 7, one_guest.output
    assert one_guest.boot_s is not None
    print(f"guest: rxe0 up after {one_guest.boot_s:.1f} s, {one_guest.total_s:.1f} s in all")


def test_rxe0_is_listed(one_guest):
    status, out = section(one_guest, "rdma_link")
    assert status == 0 and re.search(r"link rxe0/1 state ACTIVE .*netdev dummy0", out), out
    status, out = section(one_guest, "ibv_devices")
    assert status == 0 and re.search(r"^\s+rxe0\s+[0-9a-f]{16}$", out, re.M), out
    assert "PORT_ACTIVE" in out and "Ethernet" in out, out


def test_rc_pingpong_over_roce_v2(one_guest):
    status, out = section(one_guest, "rc_pingpong")
    assert status == 0, out
    # Both ends exchanged 50 round trips, addressed by the RoCE v2 GID of 10.99.0.1.
    assert len(re.findall(r"^50 iters in", out, re.M)) == 2, out
    assert "GID ::ffff:10.99.0.1" in out, out


def test_rdma_cm_rping_and_ucmatose(one_guest):
    status, out = section(one_guest, "rping")
    assert status == 0, out
    assert out.count("server ping data: rdma-ping-4") == 1, out
    assert out.count("\nping data: rdma-ping-4") == 1, out
    status, out = section(one_guest, "ucmatose")
    assert status == 0 and out.count("test complete") == 2, out
    assert "return status 0" in out and "error" not in out, out


# (No "kbloop" in these tests' names: scripts/asan.sh selects its tests with -k kbloop.)
def test_project_python_runs_in_the_guest(one_guest):
    status, out = section(one_guest, "python")
    assert status == 0, out
    bindir = os.path.dirname(sys.executable)
    assert out.splitlines()[0] == os.path.join(bindir, "python3"), out
    assert f"executable {sys.executable}" in out, out
    assert f"kbloop {os.path.join(rdma_vm.REPO, 'kbloop', '__init__.py')}" in out, out
    assert "loop ran" in out, out


def test_guest_failures_are_not_command_failures():
    # A kernel panic (panic=-1 reboots, -no-reboot ends QEMU): no status, GuestError.
    with pytest.raises(rdma_vm.GuestError, match="crashed") as crash:
        rdma_vm.run_guest("echo c >/proc/sysrq-trigger; sleep 30", timeout=60)
    assert "Kernel panic" in crash.value.console
    with pytest.raises(rdma_vm.GuestTimeout, match="did not finish in 4 s"):
        rdma_vm.run_guest("sleep 60", timeout=4)


def test_two_guests_rping_over_the_link():
    server_cmd = "rping -s -a $VM_ADDR -C 5 -v"
    client_cmd = """
        for i in $(seq 50); do rping -c -a $VM_PEER -C 5 -v && exit 0; sleep 0.2; done; exit 1"""
    server, client = rdma_vm.run_pair(server_cmd, client_cmd, timeout=120)
    assert server.status == 0 and client.status == 0, (server.output, client.output)
    assert "server ping data: rdma-ping-4" in server.output, server.output
    assert "\nping data: rdma-ping-4" in "\n" + client.output, client.output
    print(f"pair: rxe0 up after {server.boot_s:.1f}/{client.boot_s:.1f} s, "
          f"{max(server.total_s, client.total_s):.1f} s in all")


def test_two_guests_survivor_reports_the_lost_peer():
    # A writer streams RDMA writes; its peer's QEMU is killed mid-run.  With retry_count 6 the
    # writer must end with IBV_WC_RETRY_EXC_ERR (status 12).  (With 7, rxe retries for ever:
    # 7 is the verbs' "infinite", so a datapath that must notice a lost peer uses <= 6.)
    rdma = "ib_write_bw -d rxe0 -R --retry_count=6 -n 1000000 -s 4096"
    client_cmd = f"""
        connected=
        for i in $(seq 60); do
            stdbuf -oL {rdma} $VM_PEER >/tmp/writer.log 2>&1 &
            writer=$!
            sleep 2
            grep -q 'remote address' /tmp/writer.log && connected=1 && break
            wait $writer
        done
        [ -n "$connected" ] || {{ echo "never connected"; cat /tmp/writer.log; exit 3; }}
        echo writing
        wait $writer; s=$?
        cat /tmp/writer.log
        rdma statistic show link rxe0/1 | grep -o 'retry_exceeded_err [0-9]*'
        exit $s"""
    with rdma_vm.start_pair(rdma, client_cmd) as (server, client):
        client.wait_for_output("writing", timeout=90)
        server.kill()
        lost = client.wait(timeout=150)
        peer = server.wait()
    assert peer.killed and peer.status is None
    assert lost.status == 1, lost.output
    assert "Failed status 12" in lost.output, lost.output
    assert "retry_exceeded_err 1" in lost.output, lost.output
