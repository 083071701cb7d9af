"""A work counter for Numba's parallel loops: threads take items with an atomic fetch-and-add.

Numba's `prange` splits its range evenly among the threads up front. On a machine whose cores are
also used by other processes that is the wrong split: one descheduled thread holds back the whole
loop while the others wait at its end. So the drivers of the kernels run one `prange` iteration
per thread, and each thread takes its next item (image or chunk) from a shared counter until none
are left: a thread that gets more of the CPU does more of the work. Which thread computes an item
never changes its result (every item is computed whole by one thread), so results stay identical.
"""
from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.extending import intrinsic


@intrinsic
def fetch_add(typingctx, addr, value):
    """Atomically add value to the int64 at address addr and return its previous value."""
    sig = types.int64(types.uintp, types.int64)

    def codegen(context, builder, signature, args):
        address, val = args
        ptr = builder.inttoptr(address, ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, val, "monotonic")

    return sig, codegen
