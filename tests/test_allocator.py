"""The apps keep freed memory for reuse (common.allocator), unless the user chose."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(__file__))

# Where a 30 MB block comes from (mmap'ed or the heap) and whether the heap keeps
# its memory as free space once the block is freed: glibc's own counters
# (mallinfo2), as differences to before the block.
CODE = """
import ctypes, json
import client_app.app, server_app.app
from common.allocator import keep_freed_memory

class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
        "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Info
before = libc.mallinfo2()
block = bytearray(30 << 20)
mapped = libc.mallinfo2().hblkhd - before.hblkhd
del block
kept = libc.mallinfo2().fordblks - before.fordblks
print(json.dumps({"applied": keep_freed_memory(), "mapped": mapped,
                  "kept_after_free": kept}))
"""


def probe(env: dict[str, str]) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CODE], env=env, capture_output=True, text=True,
        check=True, cwd=REPO,
    )  # fmt: skip
    return json.loads(out.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_the_apps_keep_freed_memory_and_respect_the_users_choice():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    kept = probe(env)
    assert kept["applied"] is True
    # The block came from the heap, and the heap kept it after the free.
    assert kept["mapped"] < 1 << 20
    assert kept["kept_after_free"] > 25 << 20
    # The user's own threshold (glibc's initial 128 KB, fixed) is left alone:
    # the block is mapped and handed back on free.
    user = probe(env | {"MALLOC_MMAP_THRESHOLD_": "131072"})
    assert user["applied"] is False
    assert user["mapped"] >= 30 << 20
    assert user["kept_after_free"] < 5 << 20
