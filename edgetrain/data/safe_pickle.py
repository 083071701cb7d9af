"""A pickle reader that never imports or calls anything: plain values and numpy arrays only.

CIFAR's "python version" files are pickles, and `pickle.load` on a file a user hands us would run
whatever callable the file names. This reader interprets only the opcodes those files use (protocol 2
as written by Python 2's cPickle, and protocols 3-5 if someone re-saves them with Python 3) and builds
dict, list, tuple, str, bytes, int, bool, None and numpy arrays from raw bytes. The only "callables" it
knows are stand-ins for the numpy array reconstruction sequence, `_codecs.encode` and `bytes()` (how
Python 3 writes bytes at protocol 2); each checks its arguments and builds the value itself. Any other GLOBAL,
STACK_GLOBAL, REDUCE, BUILD, INST, OBJ or NEWOBJ target is refused with a DataError, before anything runs.
"""

from __future__ import annotations

import math
import pickletools
import re
from pathlib import Path
from typing import Any

import numpy as np

from edgetrain.errors import DataError

# Opcode bytes (pickle.py names). Only these are understood; every other byte is refused.
PROTO, FRAME, STOP = 0x80, 0x95, ord(".")
MARK, EMPTY_DICT, EMPTY_LIST, EMPTY_TUPLE = ord("("), ord("}"), ord("]"), ord(")")
BINUNICODE, SHORT_BINUNICODE, BINUNICODE8 = ord("X"), 0x8C, 0x8D
BINSTRING, SHORT_BINSTRING = ord("T"), ord("U")
BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8 = ord("B"), ord("C"), 0x8E, 0x96
BININT, BININT1, BININT2, LONG1, LONG4 = ord("J"), ord("K"), ord("M"), 0x8A, 0x8B
APPEND, APPENDS, SETITEM, SETITEMS = ord("a"), ord("e"), ord("s"), ord("u")
BINPUT, LONG_BINPUT, MEMOIZE, BINGET, LONG_BINGET = ord("q"), ord("r"), 0x94, ord("h"), ord("j")
TUPLE, TUPLE1, TUPLE2, TUPLE3 = ord("t"), 0x85, 0x86, 0x87
NONE, NEWTRUE, NEWFALSE = ord("N"), 0x88, 0x89
GLOBAL, STACK_GLOBAL, REDUCE, BUILD = ord("c"), 0x93, ord("R"), ord("b")
# Opcodes that name or call arbitrary objects; named in the refusal so the user sees why.
REFUSED = {ord("i"): "INST", ord("o"): "OBJ", 0x81: "NEWOBJ", 0x92: "NEWOBJ_EX", ord("P"): "PERSID",
           ord("Q"): "BINPERSID", 0x82: "EXT1", 0x83: "EXT2", 0x84: "EXT4", 0x97: "NEXT_BUFFER",
           0x98: "READONLY_BUFFER"}

# Names only (pickletools is a disassembler's table), for messages about opcodes we do not read.
OPCODE_NAMES = {ord(o.code): o.name for o in pickletools.opcodes}
HIGHEST_PROTOCOL = 5
MAX_NAME_LENGTH = 1024  # longer than any module path; a longer "name" is not a real GLOBAL
MAX_SHOWN = 80  # characters of a name from the file quoted in an error
MAX_ARRAY_DIMS = 32  # numpy's own limit; a larger count in a file is corruption, not data

_RECONSTRUCT = "numpy._reconstruct"
_NDARRAY = "numpy.ndarray"
_DTYPE = "numpy.dtype"
_FROMBUFFER = "numpy._frombuffer"
_ENCODE = "_codecs.encode"
_BYTES = "bytes"
# numpy 1.x pickles name numpy.core, numpy 2.x numpy._core; both mean the same functions.
ALLOWED_GLOBALS: dict[tuple[str, str], str] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DTYPE,
    ("numpy.core.numeric", "_frombuffer"): _FROMBUFFER,
    ("numpy._core.numeric", "_frombuffer"): _FROMBUFFER,
    ("_codecs", "encode"): _ENCODE,
    # Python 3 writes an empty bytes object at protocol 2 as bytes() (e.g. an empty array's data).
    ("__builtin__", "bytes"): _BYTES,
    ("builtins", "bytes"): _BYTES,
}
# Only fixed-size numeric element types: an object dtype would need unpickling of its elements.
_DTYPE_CODE = re.compile(r"^[<>|=]?(b1|[iu][1248]|f[248])$")
_BYTE_ORDERS = ("<", ">", "|", "=")
_LATIN1 = ("latin1", "latin-1", "iso-8859-1")


class _Global:
    """Stand-in for an allowed GLOBAL: a name, never the real object."""

    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name


class _DtypeStub:
    """A numpy.dtype(...) result waiting for its BUILD (which sets the byte order)."""

    __slots__ = ("code", "order", "memo_keys")

    def __init__(self, code: str):
        self.code = code
        self.order = "="
        self.memo_keys: list[int] = []

    def dtype(self) -> np.dtype:
        return np.dtype(self.order + self.code.lstrip("".join(_BYTE_ORDERS)))


class _ArrayStub:
    """A numpy _reconstruct(...) result waiting for the BUILD that carries its shape and bytes."""

    __slots__ = ("memo_keys",)

    def __init__(self) -> None:
        self.memo_keys: list[int] = []


class _Refused(Exception):
    """Internal: carries the refusal text up to where the file name is known."""


def _type_name(obj: Any) -> str:
    if isinstance(obj, _Global):
        return obj.name
    if isinstance(obj, _DtypeStub):
        return "numpy.dtype"
    if isinstance(obj, _ArrayStub):
        return "numpy array"
    return type(obj).__name__


def _show(text: str) -> str:
    """Text from the file, escaped and shortened so the error stays one readable line."""
    escaped = text.encode("unicode_escape").decode("ascii").replace("'", "\\'")
    return escaped if len(escaped) <= MAX_SHOWN else escaped[:MAX_SHOWN] + "..."


def _py2_text(value: Any) -> Any:
    """Python 2 wrote dtype codes and byte orders as str, which arrive here as ASCII bytes."""
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return value


def _array_from_state(stub_state: Any) -> np.ndarray:
    """Build the array that ndarray.__setstate__ would, from (version, shape, dtype, fortran, bytes)."""
    if not isinstance(stub_state, tuple) or len(stub_state) not in (4, 5):
        raise _Refused("BUILD of a numpy array with an unexpected state")
    shape, dtype, fortran, raw = stub_state[-4:]
    if not isinstance(dtype, _DtypeStub):
        raise _Refused(f"BUILD of a numpy array with dtype {_type_name(dtype)}")
    if type(fortran) not in (bool, int):
        raise _Refused(f"BUILD of a numpy array with a {_type_name(fortran)} order flag")
    if not isinstance(raw, bytes):
        # A list here means an object array, whose elements would themselves need unpickling.
        raise _Refused(f"BUILD of a numpy array whose data is {_type_name(raw)}, not raw bytes")
    return _array_from_bytes(raw, dtype.dtype(), shape, "F" if fortran else "C")


def _array_from_bytes(raw: bytes, dtype: np.dtype, shape: Any, order: str) -> np.ndarray:
    if (not isinstance(shape, tuple) or len(shape) > MAX_ARRAY_DIMS
            or not all(type(d) is int and d >= 0 for d in shape)):
        raise _Refused(f"numpy array with an invalid shape {shape!r}")
    expected = math.prod(shape) * dtype.itemsize
    if len(raw) != expected:
        raise _Refused(f"numpy array of shape {shape} {dtype} needs {expected} bytes, the file holds {len(raw)}")
    return np.frombuffer(raw, dtype=dtype).reshape(shape, order=order)


def _call(func: Any, args: Any) -> Any:
    """REDUCE: only the allowed stand-ins, each with exactly the arguments numpy/pickle write."""
    if not isinstance(func, _Global):
        raise _Refused(f"REDUCE on {_type_name(func)}")
    if not isinstance(args, tuple):
        raise _Refused(f"REDUCE {func.name} with arguments of type {_type_name(args)}")
    if func.name == _ENCODE:
        if len(args) == 2 and isinstance(args[0], str) and isinstance(args[1], str) and args[1] in _LATIN1:
            try:
                return args[0].encode("latin1")
            except UnicodeEncodeError:
                raise _Refused("REDUCE _codecs.encode of text that is not latin-1") from None
    elif func.name == _BYTES:
        if not args:
            return b""
    elif func.name == _DTYPE:
        # numpy writes dtype(code, align, copy) with bools (Python 3) or 0/1 (Python 2).
        code = _py2_text(args[0]) if args else None
        if 1 <= len(args) <= 3 and isinstance(code, str):
            if not _DTYPE_CODE.match(code):
                raise _Refused(f"REDUCE numpy.dtype '{_show(code)}': only bool, integer and float arrays are read")
            return _DtypeStub(code)
    elif func.name == _RECONSTRUCT:
        if len(args) == 3 and isinstance(args[0], _Global) and args[0].name == _NDARRAY:
            return _ArrayStub()
    elif func.name == _FROMBUFFER:
        if (len(args) == 4 and isinstance(args[0], bytes) and isinstance(args[1], _DtypeStub)
                and isinstance(args[3], str) and args[3] in ("C", "F")):
            return _array_from_bytes(args[0], args[1].dtype(), args[2], args[3])
    raise _Refused(f"REDUCE {func.name} with unexpected arguments")


def _build(target: Any, state: Any) -> Any:
    if isinstance(target, _DtypeStub):
        # dtype state: (version, byte order, subarray, names, fields, ...); the last three must be
        # empty, or it is a structured dtype that could hold objects.
        order = _py2_text(state[1]) if isinstance(state, tuple) and len(state) > 1 else None
        if (not isinstance(state, tuple) or len(state) < 5 or not isinstance(order, str)
                or order not in _BYTE_ORDERS or any(s is not None for s in state[2:5])):
            raise _Refused("BUILD of a numpy.dtype with an unexpected state")
        target.order = order
        return target
    if isinstance(target, _ArrayStub):
        return _array_from_state(state)
    raise _Refused(f"BUILD on {_type_name(target)}")


def _check_plain(value: Any) -> None:
    """The result may hold only plain values and arrays, never a stand-in (walks cycles safely)."""
    seen: set[int] = set()
    todo = [value]
    while todo:
        v = todo.pop()
        if isinstance(v, (_Global, _DtypeStub, _ArrayStub)):
            raise _Refused(f"result holds a bare {_type_name(v)}")
        if isinstance(v, (list, tuple, dict)) and id(v) not in seen:
            seen.add(id(v))
            todo.extend(v.values() if isinstance(v, dict) else v)
            if isinstance(v, dict):
                todo.extend(v.keys())


class _Reader:
    def __init__(self, data: bytes | memoryview):
        self.data = memoryview(data)
        self.pos = 0
        self.stack: list[Any] = []
        self.metastack: list[list[Any]] = []
        self.memo: dict[int, Any] = {}

    def take(self, n: int) -> memoryview:
        if n < 0 or self.pos + n > len(self.data):
            raise EOFError
        chunk = self.data[self.pos:self.pos + n]
        self.pos += n
        return chunk

    def uint(self, n: int) -> int:
        return int.from_bytes(self.take(n), "little")

    def line(self) -> str:
        """A newline-terminated name (GLOBAL, INST), searched in a bounded window."""
        # Names are short; copying the rest of a 150 MB file per GLOBAL to search it would be slow.
        window = bytes(self.data[self.pos:self.pos + MAX_NAME_LENGTH + 1])
        end = window.find(b"\n")
        if end < 0:
            raise EOFError if len(window) <= MAX_NAME_LENGTH else _Refused("GLOBAL name too long")
        self.pos += end + 1
        return window[:end].decode("utf-8", "replace")

    def pop_mark(self) -> list[Any]:
        if not self.metastack:
            raise _Refused("missing MARK")
        items = self.stack
        self.stack = self.metastack.pop()
        return items

    def push(self, value: Any) -> None:
        self.stack.append(value)

    def pop(self) -> Any:
        if not self.stack:
            raise _Refused("stack underflow")
        return self.stack.pop()

    def top(self) -> Any:
        if not self.stack:
            raise _Refused("stack underflow")
        return self.stack[-1]

    def put(self, key: int) -> None:
        value = self.top()
        if isinstance(value, (_DtypeStub, _ArrayStub)):
            value.memo_keys.append(key)  # so BUILD can swap the finished value into the memo too
        self.memo[key] = value

    def get(self, key: int) -> None:
        if key not in self.memo:
            raise _Refused(f"memo key {key} read before it was written")
        self.stack.append(self.memo[key])

    def global_target(self, module: str, name: str, opcode: str) -> _Global:
        allowed = ALLOWED_GLOBALS.get((module, name))
        if allowed is None:
            raise _Refused(f"refused pickle opcode {opcode} '{_show(module)} {_show(name)}'")
        return _Global(allowed)

    def run(self) -> Any:
        while True:
            op_pos = self.pos
            op = self.uint(1)
            try:
                if op == STOP:
                    value = self.pop()
                    _check_plain(value)
                    return value
                self.step(op)
            except _Refused as exc:
                raise _Refused(f"{exc} at byte {op_pos}") from None

    def step(self, op: int) -> None:
        push = self.push  # not self.stack.append: pop_mark rebinds self.stack
        if op == PROTO:
            proto = self.uint(1)
            if proto > HIGHEST_PROTOCOL:
                raise _Refused(f"unsupported pickle protocol {proto}")
        elif op == FRAME:
            self.uint(8)  # framing only groups opcodes for buffered reads; the content follows inline
        elif op == MARK:
            self.metastack.append(self.stack)
            self.stack = []
        elif op == EMPTY_DICT:
            push({})
        elif op == EMPTY_LIST:
            push([])
        elif op == EMPTY_TUPLE:
            push(())
        elif op in (BINUNICODE, SHORT_BINUNICODE, BINUNICODE8):
            size = self.uint({BINUNICODE: 4, SHORT_BINUNICODE: 1, BINUNICODE8: 8}[op])
            try:
                push(str(self.take(size), "utf-8", "surrogatepass"))
            except UnicodeDecodeError:
                raise _Refused("text that is not UTF-8") from None
        elif op in (BINSTRING, SHORT_BINSTRING):
            # Python 2 str: raw bytes (pickle.load(encoding="bytes") semantics); numpy data arrives this way.
            size = int.from_bytes(self.take(4), "little", signed=True) if op == BINSTRING else self.uint(1)
            push(bytes(self.take(size)))
        elif op in (BINBYTES, SHORT_BINBYTES, BINBYTES8, BYTEARRAY8):
            size = self.uint({BINBYTES: 4, SHORT_BINBYTES: 1, BINBYTES8: 8, BYTEARRAY8: 8}[op])
            push(bytes(self.take(size)))
        elif op == BININT:
            push(int.from_bytes(self.take(4), "little", signed=True))
        elif op == BININT1:
            push(self.uint(1))
        elif op == BININT2:
            push(self.uint(2))
        elif op in (LONG1, LONG4):
            size = self.uint(1) if op == LONG1 else int.from_bytes(self.take(4), "little", signed=True)
            push(int.from_bytes(self.take(size), "little", signed=True))
        elif op == NONE:
            push(None)
        elif op == NEWTRUE:
            push(True)
        elif op == NEWFALSE:
            push(False)
        elif op == APPEND:
            value = self.pop()
            self.append_to(self.top(), [value])
        elif op == APPENDS:
            items = self.pop_mark()
            self.append_to(self.top(), items)
        elif op == SETITEM:
            value, key = self.pop(), self.pop()
            self.set_items(self.top(), [key, value])
        elif op == SETITEMS:
            items = self.pop_mark()
            self.set_items(self.top(), items)
        elif op == TUPLE:
            push(tuple(self.pop_mark()))
        elif op in (TUPLE1, TUPLE2, TUPLE3):
            n = op - TUPLE1 + 1
            if len(self.stack) < n:
                raise _Refused("stack underflow")
            items = tuple(self.stack[-n:])
            del self.stack[-n:]
            push(items)
        elif op == BINPUT:
            self.put(self.uint(1))
        elif op == LONG_BINPUT:
            self.put(self.uint(4))
        elif op == MEMOIZE:
            self.put(len(self.memo))
        elif op == BINGET:
            self.get(self.uint(1))
        elif op == LONG_BINGET:
            self.get(self.uint(4))
        elif op == GLOBAL:
            module, name = self.line(), self.line()
            push(self.global_target(module, name, "GLOBAL"))
        elif op == STACK_GLOBAL:
            name, module = self.pop(), self.pop()
            if not isinstance(module, str) or not isinstance(name, str):
                raise _Refused("refused pickle opcode STACK_GLOBAL with a non-text name")
            push(self.global_target(module, name, "STACK_GLOBAL"))
        elif op == REDUCE:
            args = self.pop()
            func = self.pop()
            push(_call(func, args))
        elif op == BUILD:
            state = self.pop()
            target = self.pop()
            built = _build(target, state)
            if built is not target:
                for key in target.memo_keys:
                    self.memo[key] = built
            push(built)
        elif op == ord("i"):
            module, name = self.line(), self.line()
            raise _Refused(f"refused pickle opcode INST '{_show(module)} {_show(name)}'")
        elif op in REFUSED:
            raise _Refused(f"refused pickle opcode {REFUSED[op]}")
        else:
            raise _Refused(f"unsupported pickle opcode {OPCODE_NAMES.get(op, 'unknown')} (0x{op:02x})")

    @staticmethod
    def append_to(target: Any, items: list[Any]) -> None:
        if not isinstance(target, list):
            raise _Refused(f"APPEND to {_type_name(target)}")
        target.extend(items)

    @staticmethod
    def set_items(target: Any, items: list[Any]) -> None:
        if not isinstance(target, dict):
            raise _Refused(f"SETITEM on {_type_name(target)}")
        if len(items) % 2:
            raise _Refused("SETITEMS with an odd number of items")
        try:
            for i in range(0, len(items), 2):
                target[items[i]] = items[i + 1]
        except TypeError:
            raise _Refused("dictionary key that is not hashable") from None


def loads_safe(data: bytes | memoryview, source: str) -> Any:
    """Decode pickle bytes into plain values and numpy arrays; `source` prefixes every error message."""
    try:
        return _Reader(data).run()
    except _Refused as exc:
        raise DataError(f"{source}: {exc} (only plain values and numpy arrays are read, nothing is run)") from None
    except EOFError:
        raise DataError(f"{source}: truncated pickle (the file ends before its STOP opcode)") from None
    except (MemoryError, OverflowError, ValueError) as exc:
        raise DataError(f"{source}: corrupt pickle ({type(exc).__name__})") from None


def load_safe(path: Path, label: str) -> Any:
    """Read a pickle file with loads_safe; errors read '<label>: <path>: <what is wrong>'."""
    source = f"{label}: {path}"
    if not path.is_file():
        raise DataError(f"{source}: file not found")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    return loads_safe(data, source)
