"""onnxruntime's C API, callable from Numba: MatMulInteger sessions run inside Numba's own threads.

The `onnxruntime` Python package ships the runtime as a shared library (`libonnxruntime.so.*`)
exporting the stable C API (`OrtGetApiBase`). Loading it with ctypes and handing three of its function
pointers (create a tensor over a caller's buffer, run a session, release a value) to Numba kernels
lets a `prange` loop lay out a chunk of patches and multiply it on the same thread, with no Python,
no GIL and no second thread pool: onnxruntime's Python `run` would need Python threads, which on a
2-core machine fight Numba's OpenMP workers (those spin for milliseconds after every parallel
region; measured: the chunked GEMMs then ran no faster on 2 threads than on 1).

Only version 1 of the C API is used (`GetApi(1)`), whose function table every later onnxruntime keeps
unchanged (the ABI is append-only); the indices below are its struct's member positions.
Sessions run single-threaded (intra-op 1): the parallelism is the caller's chunks.
"""
from __future__ import annotations

import ctypes
import glob
import importlib.util
import os
import threading

import numpy as np
from numba import njit

_API_VERSION = 1
# Member positions in OrtApi (C API version 1).
_GET_ERROR_MESSAGE = 2
_CREATE_ENV = 3
_CREATE_SESSION_FROM_ARRAY = 8
_RUN = 9
_CREATE_SESSION_OPTIONS = 10
_SET_SESSION_EXECUTION_MODE = 13
_SET_SESSION_GRAPH_OPTIMIZATION_LEVEL = 23
_SET_INTRA_OP_NUM_THREADS = 24
_SET_INTER_OP_NUM_THREADS = 25
_CREATE_TENSOR_WITH_DATA_AS_ORT_VALUE = 49
_CREATE_CPU_MEMORY_INFO = 69
_RELEASE_STATUS = 93
_RELEASE_VALUE = 96
_RELEASE_SESSION_OPTIONS = 100

# ONNXTensorElementDataType
UINT8, INT8, INT32 = 2, 3, 6

_P = ctypes.c_size_t  # every pointer travels as a 64-bit integer (Numba passes arrays' .ctypes.data)
_STATUS = ctypes.c_size_t  # OrtStatus*: 0 is success

# Prototypes of the three functions the Numba kernels call.
CREATE_TENSOR = ctypes.CFUNCTYPE(_STATUS, _P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, ctypes.c_int, _P)
RUN = ctypes.CFUNCTYPE(_STATUS, _P, _P, _P, _P, ctypes.c_size_t, _P, ctypes.c_size_t, _P)
RELEASE_VALUE = ctypes.CFUNCTYPE(None, _P)


def library_path() -> str | None:
    """The onnxruntime shared library inside the installed Python package, if any."""
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for pattern in ("libonnxruntime.so*", "libonnxruntime*.dylib", "onnxruntime.dll"):
            hits = sorted(glob.glob(os.path.join(root, "capi", pattern)))
            if hits:
                return hits[0]
    return None


class OrtCApi:
    """The loaded library, one environment, a CPU memory info and MatMulInteger sessions by zero points."""

    def __init__(self, path: str | None = None):
        path = path or library_path()
        if path is None:
            raise OSError("onnxruntime's shared library was not found")
        self._lib = ctypes.CDLL(path)
        self._lib.OrtGetApiBase.restype = ctypes.POINTER(ctypes.c_void_p * 2)
        base = self._lib.OrtGetApiBase().contents
        get_api = ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)(base[0])
        self.version = ctypes.CFUNCTYPE(ctypes.c_char_p)(base[1])().decode()
        table = get_api(_API_VERSION)
        if not table:
            raise OSError(f"onnxruntime {self.version} does not provide C API version {_API_VERSION}")
        self._table = ctypes.cast(table, ctypes.POINTER(ctypes.c_void_p))
        self.create_tensor = CREATE_TENSOR(self._fn(_CREATE_TENSOR_WITH_DATA_AS_ORT_VALUE))
        self.run = RUN(self._fn(_RUN))
        self.release_value = RELEASE_VALUE(self._fn(_RELEASE_VALUE))
        self._error_message = ctypes.CFUNCTYPE(ctypes.c_char_p, _P)(self._fn(_GET_ERROR_MESSAGE))
        self._release_status = ctypes.CFUNCTYPE(None, _P)(self._fn(_RELEASE_STATUS))

        env = ctypes.c_size_t(0)
        self.check(ctypes.CFUNCTYPE(_STATUS, ctypes.c_int, ctypes.c_char_p, _P)(self._fn(_CREATE_ENV))(
            4, b"edgetrain", ctypes.addressof(env)))  # ORT_LOGGING_LEVEL_FATAL: errors are raised, not logged
        self._env = env.value
        info = ctypes.c_size_t(0)
        self.check(ctypes.CFUNCTYPE(_STATUS, ctypes.c_int, ctypes.c_int, _P)(self._fn(_CREATE_CPU_MEMORY_INFO))(
            0, 0, ctypes.addressof(info)))  # OrtDeviceAllocator, OrtMemTypeDefault
        self.memory_info = info.value
        # Names as C strings, and arrays of their addresses (const char* const*), kept alive here.
        self._names = [ctypes.create_string_buffer(s) for s in (b"A", b"B", b"Y")]
        self.input_names = np.array([ctypes.addressof(self._names[0]), ctypes.addressof(self._names[1])], np.uint64)
        self.output_names = np.array([ctypes.addressof(self._names[2])], np.uint64)
        self._sessions: dict[tuple[int, int], int] = {}
        self._lock = threading.Lock()

    def _fn(self, index: int) -> int:
        address = self._table[index]
        if not address:
            raise OSError(f"onnxruntime C API entry {index} is missing")
        return address

    def check(self, status: int) -> None:
        """Raise onnxruntime's message for a non-null OrtStatus* (and free it)."""
        if status:
            message = self._error_message(status)
            self._release_status(status)
            raise RuntimeError(f"onnxruntime: {message.decode(errors='replace') if message else 'error'}")

    def release_status(self, status: int) -> None:
        self._release_status(status)

    def session(self, za: int, zb: int) -> int:
        """OrtSession* of a single-threaded MatMulInteger(A uint8, B int8, za, zb) -> int32."""
        key = (za, zb)
        with self._lock:
            if key not in self._sessions:
                self._sessions[key] = self._create_session(za, zb)
            return self._sessions[key]

    def _create_session(self, za: int, zb: int) -> int:
        from onnx import TensorProto, helper

        graph = helper.make_graph(
            [helper.make_node("MatMulInteger", ["A", "B", "za", "zb"], ["Y"])], "mmi",
            [helper.make_tensor_value_info("A", TensorProto.UINT8, None),
             helper.make_tensor_value_info("B", TensorProto.INT8, None)],
            [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
            initializer=[helper.make_tensor("za", TensorProto.UINT8, [], [za]),
                         helper.make_tensor("zb", TensorProto.INT8, [], [zb])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
        model.ir_version = 8
        data = model.SerializeToString()
        opts = ctypes.c_size_t(0)
        fn = ctypes.CFUNCTYPE(_STATUS, _P)(self._fn(_CREATE_SESSION_OPTIONS))
        self.check(fn(ctypes.addressof(opts)))
        try:
            set_int = ctypes.CFUNCTYPE(_STATUS, _P, ctypes.c_int)
            self.check(set_int(self._fn(_SET_INTRA_OP_NUM_THREADS))(opts.value, 1))
            self.check(set_int(self._fn(_SET_INTER_OP_NUM_THREADS))(opts.value, 1))
            self.check(set_int(self._fn(_SET_SESSION_EXECUTION_MODE))(opts.value, 0))  # sequential
            self.check(set_int(self._fn(_SET_SESSION_GRAPH_OPTIMIZATION_LEVEL))(opts.value, 0))  # none
            sess = ctypes.c_size_t(0)
            create = ctypes.CFUNCTYPE(_STATUS, _P, ctypes.c_char_p, ctypes.c_size_t, _P, _P)
            self.check(create(self._fn(_CREATE_SESSION_FROM_ARRAY))(self._env, data, len(data), opts.value,
                                                                     ctypes.addressof(sess)))
        finally:
            ctypes.CFUNCTYPE(None, _P)(self._fn(_RELEASE_SESSION_OPTIONS))(opts.value)
        return sess.value


# ------------------------------------------------------------------------------ from Numba


@njit(nogil=True, cache=True)
def matmul_integer(create, run, release, memory_info, session, in_names, out_names,
                   a, a_dims, b, b_dims, y, y_dims, shapes, values):
    """y = MatMulInteger(a, b) into y's own buffer; a, b, y are C-contiguous arrays viewed with the
    first `*_dims` entries of rows 0..2 of `shapes` (int64 (3, 3)); `values` is int64 (3,) scratch
    for the OrtValue handles. Returns the OrtStatus* (0 on success; the caller reports it)."""
    for i in range(3):
        values[i] = 0
    status = create(memory_info, a.ctypes.data, a.size, shapes[0].ctypes.data, a_dims, UINT8, values.ctypes.data)
    if status == 0:
        status = create(memory_info, b.ctypes.data, b.size, shapes[1].ctypes.data, b_dims, INT8,
                        values.ctypes.data + 8)
    if status == 0:
        status = create(memory_info, y.ctypes.data, y.size * 4, shapes[2].ctypes.data, y_dims, INT32,
                        values.ctypes.data + 16)
    if status == 0:
        status = run(session, 0, in_names.ctypes.data, values.ctypes.data, 2, out_names.ctypes.data, 1,
                     values.ctypes.data + 16)
    for i in range(3):
        if values[i] != 0:
            release(values[i])
    return status


@njit(nogil=True, cache=True)
def matmul_views(create, run, release, memory_info, session, in_names, out_names, a, b, y, shapes, values):
    """matmul_integer with each operand's dims and shape read off the (C-contiguous) array itself."""
    for d in range(a.ndim):
        shapes[0, d] = a.shape[d]
    for d in range(b.ndim):
        shapes[1, d] = b.shape[d]
    for d in range(y.ndim):
        shapes[2, d] = y.shape[d]
    return matmul_integer(create, run, release, memory_info, session, in_names, out_names,
                          a, a.ndim, b, b.ndim, y, y.ndim, shapes, values)
