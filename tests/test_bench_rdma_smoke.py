"""`python -m bench.rdma_guest --smoke`: the RDMA-vs-io_uring benchmark runs in the soft-RoCE
guest (tests/rdma_vm.py) and reports every datapath.  A check of the machinery (every echoed
byte is checked by its client), never of speed: no assertion here compares the numbers.
"""

import json
import re
import subprocess
import sys

import pytest

import rdma_vm

ok, why_not = rdma_vm.available()
pytestmark = pytest.mark.skipif(not ok, reason=f"no RDMA test guest here: {why_not}")

REPO = rdma_vm.REPO
VARIANTS = ["rdma-sleep", "rdma-busy", "uring"]
NUMBER = re.compile(r"^([\d,]+(?:\.\d+)?)")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("rdma-bench")
    proc = subprocess.run([sys.executable, "-m", "bench.rdma_guest", "--smoke", "--quiet",
                           "--out-dir", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=240)
    files = sorted(out.glob("rdma-smoke-*.json"))
    return proc, json.loads(files[0].read_text()) if files else None, out


def table_rows(stdout):
    """{datapath: [cells]} of the printed markdown table."""
    rows = {}
    for line in stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] in VARIANTS:
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.timeout(300)
def test_smoke_table_has_every_datapath_with_positive_numbers(smoke):
    proc, data, _ = smoke
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "| datapath | RTT p50 µs | RTT p99 µs | 8×1 KiB req/s | bulk MiB/s |" in proc.stdout
    rows = table_rows(proc.stdout)
    assert sorted(rows) == sorted(VARIANTS), out[-4000:]
    for variant, cells in rows.items():
        assert len(cells) == 5, (variant, cells)
        for cell in cells:
            m = NUMBER.match(cell)
            assert m and float(m.group(1).replace(",", "")) > 0, (variant, cells)
        # ratios to io_uring, from the same run
        assert all(re.search(r"\(\d+\.\d\dx\)$", c) for c in cells), (variant, cells)
    assert all(c.endswith("(1.00x)") for c in rows["uring"])


@pytest.mark.timeout(300)
def test_smoke_samples_ran_on_the_intended_datapaths(smoke):
    proc, data, out = smoke
    assert data is not None, (proc.stdout + proc.stderr)[-4000:]
    samples = {s["variant"]: s for s in data["samples"]}
    assert sorted(samples) == sorted(VARIANTS)
    for variant, s in samples.items():
        assert s["ok"] and s["server_exit"] == 0, s.get("failure")
        assert s["backend"] == ("io_uring" if variant == "uring" else "rdma"), s["backend"]
        assert s["socket_type"] == ("socket" if variant == "uring" else "RdmaSocket")
        assert s["lat"]["round_trips"] == len(s["lat"]["rtts_us"]) > 0
        assert s["rps"]["requests"] > 0 and s["bulk"]["bytes"] > 0
    # A smoke run never replaces the committed report.
    assert not (out / "RDMA.md").exists()
    assert len(list(out.glob("rdma-smoke-*.md"))) == 1
