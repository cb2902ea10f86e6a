"""Host malloc tuning (mbcompile/hostmem.py): applied once when a CPU program is built, visible in
explain(), effective (big blocks stop being mmap'd), and off with MBCOMPILE_MALLOC=0. Each case runs in
a fresh interpreter: the settings are process-wide."""
import ctypes
import json
import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="glibc malloc only")

CHILD = r"""
import ctypes, json, torch, torch.nn as nn, mbcompile

class MallInfo2(ctypes.Structure):
    _fields_ = [(k, ctypes.c_size_t) for k in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.mallinfo2.restype = MallInfo2

def mmapped_blocks_for_big_tensor():
    n0 = libc.mallinfo2().hblks
    t = torch.empty(64 << 20, dtype=torch.uint8)     # 64 MiB: above glibc's largest mmap threshold
    n = libc.mallinfo2().hblks - n0
    del t
    return n

before = mmapped_blocks_for_big_tensor()
b = mbcompile.batch([nn.Linear(3, 2) for _ in range(2)])
b(torch.randn(4, 3))
notes = mbcompile.explain(b).notes
after = mmapped_blocks_for_big_tensor()
b2 = mbcompile.batch([nn.Linear(3, 2) for _ in range(2)])
b2(torch.randn(4, 3))
from mbcompile import hostmem
big = torch.ones(256 << 20, dtype=torch.uint8)      # 256 MiB from the heap, then freed: stays resident
del big
held = libc.mallinfo2().fordblks                      # free bytes held by malloc
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096
rss_held = rss()
released = hostmem.release()
print(json.dumps({"before": before, "after": after, "notes": notes, "notes2": mbcompile.explain(b2).notes,
                  "held": held, "released": released, "rss_drop": rss_held - rss()}))
"""


def _child(env_extra):
    env = {**os.environ, **env_extra}
    env.pop("MALLOC_MMAP_MAX_", None)
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def _has_mallinfo2():
    return hasattr(ctypes.CDLL("libc.so.6"), "mallinfo2")


@pytest.mark.skipif(not _has_mallinfo2(), reason="mallinfo2 needs glibc >= 2.33")
def test_first_cpu_program_stops_big_blocks_being_mmapped():
    r = _child({"MBCOMPILE_MALLOC": ""})
    assert r["before"] >= 1                      # glibc's default: a 64 MiB tensor is its own mmap
    assert r["after"] == 0                       # after mbcompile built a CPU program: from the heap
    assert any("M_MMAP_MAX=0" in s for s in r["notes"])
    assert r["notes2"] == r["notes"]             # applied once; later programs report the same
    assert r["held"] >= 256 << 20 and r["released"]   # freed heap is kept; release() hands it back
    assert r["rss_drop"] >= 200 << 20, r["rss_drop"]


@pytest.mark.skipif(not _has_mallinfo2(), reason="mallinfo2 needs glibc >= 2.33")
def test_mbcompile_malloc_0_leaves_malloc_alone():
    r = _child({"MBCOMPILE_MALLOC": "0"})
    assert r["before"] >= 1 and r["after"] >= 1
    assert any("MBCOMPILE_MALLOC=0" in s for s in r["notes"])


WORKERS = r"""
import json, torch, torch.nn as nn, mbcompile
from mbcompile import cores, hostmem
torch.set_num_threads(2)
(torch.randn(300, 300) @ torch.randn(300, 300)).sum()          # torch's OpenMP thread has its arena
b = mbcompile.batch([nn.Linear(3, 2) for _ in range(2)])         # the first CPU program tunes malloc
b(torch.randn(4, 3))
where = cores.map_models(lambda i: hostmem.in_main_arena(torch.empty(1 << 18).data_ptr()), 4)
print(json.dumps({"workers": cores.workers(4), "main": where}))
"""


@pytest.mark.parametrize("malloc", ["", "0"])
def test_worker_threads_allocate_from_the_main_arena(malloc):
    """cores.py's worker threads allocate from glibc's main arena, where tune()'s settings hold (their
    own arenas unmap each emptied 64 MiB heap: page faults on every step for a worker holding LSTM
    workspaces); with MBCOMPILE_MALLOC=0 glibc is left alone and they get arenas of their own."""
    env = {**os.environ, "MBCOMPILE_MALLOC": malloc}
    env.pop("MALLOC_ARENA_MAX", None)
    out = subprocess.run([sys.executable, "-c", WORKERS], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    if r["workers"] < 2:
        pytest.skip("no worker threads in this build (torch's threads are not OpenMP's)")
    assert all(r["main"]) if malloc == "" else not any(r["main"]), r
