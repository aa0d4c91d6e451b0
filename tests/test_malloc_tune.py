"""kbloop keeps glibc from trimming the heap after every large free (bench/results/PROFILE.md)."""
import json
import os
import subprocess
import sys

import pytest

# Allocate and free the kind of chunks the receive path makes, then ask glibc how much free
# memory sits at the top of the heap (mallinfo2().keepcost): trimmed back to < 128 KiB with
# glibc's defaults, kept when kbloop has tuned the allocator.
PROBE = r'''
import ctypes, json, kbloop
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in (
        'arena', 'ordblks', 'smblks', 'hblks', 'hblkhd', 'usmblks', 'fsmblks',
        'uordblks', 'fordblks', 'keepcost')]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
loop = kbloop.new_event_loop()
chunks = [bytes(bytearray(100_000)) for _ in range(64)]
del chunks
print(json.dumps({'tuned': kbloop._tune_malloc_once(), 'keepcost': libc.mallinfo2().keepcost}))
loop.close()
'''


def probe(**env):
    out = subprocess.run([sys.executable, '-c', PROBE], env={**os.environ, **env},
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def test_heap_top_is_kept_for_the_next_receive():
    result = probe()
    assert result['tuned'] is True
    assert result['keepcost'] > 4 << 20


@pytest.mark.parametrize('env', [{'KBLOOP_MALLOC_TUNE': '0'},
                                 {'MALLOC_TRIM_THRESHOLD_': '131072'}])
def test_opt_out_and_user_settings_leave_glibc_alone(env):
    result = probe(**env)
    assert result['tuned'] is False
    assert result['keepcost'] < 1 << 20
