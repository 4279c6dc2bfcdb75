"""A clear last word when a memory-mapped weights file is truncated under a running model.

A read of a mapped page past the end of a file that shrank ends the process with SIGBUS, most
often inside a compiled kernel, where no Python code can run: a Python ``signal.signal`` handler
only sets a flag for the interpreter, so the faulting instruction would run again forever, and a
``ctypes`` callback would need the interpreter lock that the thread waiting for the kernel holds.
:func:`watch` therefore installs, once per process, a three-instruction native handler built with
llvmlite (Numba's code generator, already loaded with the runtime): it writes a message naming the
mapped weights files and the ``mmap=False`` (``--no-mmap``) advice to standard error with
``write(2)``, puts back the default action with ``signal(2)`` (both async-signal-safe) and
returns, so the fault happens again and ends the process as before, now with a reason.

The cheaper check comes first: :meth:`edgelora.bundle.Bundle.check` compares the file's size with
the size it had before every forward step and raises ``FormatError`` with the same advice, so a
file truncated between generations is an exception, not a crash; the handler covers a truncation
in the middle of a step. Where llvmlite or ``signal(2)`` is missing (Windows) nothing is installed.
"""

from __future__ import annotations

import ctypes
import signal
import threading
from pathlib import Path

MESSAGE_BYTES = 8192
MAX_FILES = 8  # the most recently mapped files named in the message
_lock = threading.Lock()
_state: dict = {}  # "buffer": the message (C string read by the handler), "engine": the JIT keeping it alive
_files: list[str] = []


def _message(files: list[str]) -> bytes:
    text = ("\nedgelora: bus error (SIGBUS) reading a memory-mapped weights file: it was truncated or rewritten in "
            f"place while this process had it mapped ({', '.join(files)}). Replace the file and load again; load with "
            "mmap=False (--no-mmap) to read the weights into memory, so that changes to the file cannot affect a "
            "running model.\n").encode(errors="replace")
    return text[:MESSAGE_BYTES - 2] + (b"\n" if len(text) > MESSAGE_BYTES - 2 else b"")


def _install() -> bool:
    """Build and install the native handler (once); False where it cannot be."""
    if "buffer" in _state:
        return True
    sigbus = getattr(signal, "SIGBUS", None)
    if sigbus is None:
        return False
    try:
        import llvmlite.binding as llvm
        from llvmlite import ir
        libc = ctypes.CDLL(None)
        address = {name: ctypes.cast(getattr(libc, name), ctypes.c_void_p).value for name in ("strlen", "write", "signal")}
        buffer = ctypes.create_string_buffer(MESSAGE_BYTES)
        at = ctypes.addressof(buffer)
        i64, i32 = ir.IntType(64), ir.IntType(32)
        module = ir.Module("edgelora_sigbus")
        fn = ir.Function(module, ir.FunctionType(ir.VoidType(), [i32]), "edgelora_on_sigbus")
        b = ir.IRBuilder(fn.append_basic_block())

        def libc_fn(name, ret, *args):
            return b.inttoptr(ir.Constant(i64, address[name]), ir.FunctionType(ret, list(args)).as_pointer())

        n = b.call(libc_fn("strlen", i64, i64), [ir.Constant(i64, at)])
        b.call(libc_fn("write", i64, i32, i64, i64), [ir.Constant(i32, 2), ir.Constant(i64, at), n])
        b.call(libc_fn("signal", i64, i32, i64), [fn.args[0], ir.Constant(i64, 0)])  # SIG_DFL, then fault again
        b.ret_void()
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        parsed = llvm.parse_assembly(str(module))
        parsed.verify()
        engine = llvm.create_mcjit_compiler(parsed, llvm.Target.from_default_triple().create_target_machine())
        engine.finalize_object()
        handler = engine.get_function_address("edgelora_on_sigbus")
        install = libc.signal
        install.argtypes, install.restype = [ctypes.c_int, ctypes.c_size_t], ctypes.c_size_t
    except Exception:  # no llvmlite, no C library symbols (not a POSIX system): the size check alone
        return False
    _state.update(buffer=buffer, engine=engine)
    install(int(sigbus), handler)
    return True


def watch(path) -> None:
    """Name ``path`` (a weights file this process maps) in the message printed on SIGBUS, installing
    the handler the first time."""
    with _lock:
        name = str(Path(path))
        if name in _files:
            _files.remove(name)
        _files.append(name)
        del _files[:-MAX_FILES]
        if _install():
            _state["buffer"].value = _message(_files)
