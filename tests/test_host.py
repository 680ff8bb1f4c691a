"""grassjax.host: glibc keeps freed memory for reuse, so a step's temporaries do not page-fault anew each call."""

import subprocess
import sys
import textwrap

import pytest

# malloc, fill and free a 64 MiB block ten times and count the minor page faults: by default glibc maps each block
# afresh (16,384 faults of 4 KiB each time); after keep_freed_memory() the heap hands back the same pages.
PROGRAM = textwrap.dedent("""
    import ctypes, resource, sys
    from grassjax import host

    if sys.argv[1] == "keep":
        if not host.keep_freed_memory():
            print("unsupported")
            sys.exit()
        assert host.kept_below_bytes == 1 << 30  # what benchmarks report
    else:
        assert host.kept_below_bytes == 0
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
    size = 64 << 20

    def use_a_block():  # what XLA:CPU does with a call's temporaries: malloc, write, free
        block = libc.malloc(size)
        ctypes.memset(block, 1, size)
        libc.free(block)

    faults = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    use_a_block()  # the first time faults either way
    before = faults()
    for _ in range(10):
        use_a_block()
    print(faults() - before)
""")

def _faults(mode: str) -> str:
    proc = subprocess.run([sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, check=True)
    return proc.stdout.strip()


def test_keep_freed_memory_stops_the_page_faults_of_a_reallocated_block():
    kept = _faults("keep")
    if kept == "unsupported":
        pytest.skip("this C library has no mallopt (not glibc)")
    default = int(_faults("default"))
    # At least 10 faults per block by default (16,384 with 4 KiB pages, 32 where transparent huge pages back it).
    assert default >= 100, f"the control should fault on every 64 MiB block: {default} faults"
    assert int(kept) * 10 < default, f"freed blocks were not reused: {kept} faults against {default} by default"
