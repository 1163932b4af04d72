"""Valgrind memcheck over the native code: no invalid access and no definite leak inside rustane's C.

tests/valgrind/exercise_native.py drives every native entry point (fp16 conversion on all SIMD paths,
staging, the dW queue from two threads with failures and close/GC while busy, every CPU op and a short
fp16 training run), checking its results against numpy. This test runs it under valgrind and fails if
any error record, or any definitely-lost block, has a stack frame in our code (the extension modules
or csrc/). Records whose stacks never touch our code are CPython / numpy / ld.so noise: they are
printed for the curious but do not fail the test, so no suppressions file is needed to stay green.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tiers import require_tools, unavailable

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "valgrind" / "exercise_native.py"
SUCCESS = "exercise_native: all checks passed"

# Our compiled code, as it shows up in a valgrind frame: C sources (with debug info), the extension
# objects or the Cython-generated C (``_native.pyx.c``), and C/Cython symbol names.
_OUR_SOURCES = {"fp16.c", "staging.c", "dw_queue.c", "cpu_ops.c", "ane_runtime.m", "simd.h", "fp16.h",
                "staging.h", "dw_queue.h", "cpu_ops.h", "blas.h", "ane_runtime.h"}
_csrc = HERE.parent / "csrc"
if _csrc.is_dir():  # pick up sources added later without editing this list
    _OUR_SOURCES |= {p.name for p in _csrc.iterdir() if p.suffix in (".c", ".h", ".m", ".S")}
_OUR_OBJECT = re.compile(r"^_(native|cpu|ane)[.]")  # _cpu.cpython-311-x86_64-linux-gnu.so, _native.pyx.c
_OUR_SYMBOL = re.compile(r"^rn_|rustane")  # rn_rope, rustane_stage, __pyx_pw_7rustane_7_native_…

_FRAME = re.compile(r"^\s*(?:at|by) 0x[0-9A-Fa-f]+: (.*?)(?: \((.*)\))?\s*$")
_PREFIX = re.compile(r"^==\d+== ?")


@dataclass
class Record:
    header: str
    lines: list[str]
    frames: list[tuple[str, str]]  # (function, location: "file.c:123" or "in /path/lib.so")

    def ours(self) -> list[str]:
        return [f"{fn} ({loc})" for fn, loc in self.frames if is_our_frame(fn, loc)]


def is_our_frame(function: str, location: str) -> bool:
    loc = location[3:] if location.startswith("in ") else location
    base = os.path.basename(loc.split(":", 1)[0])
    return base in _OUR_SOURCES or bool(_OUR_OBJECT.match(base)) or bool(_OUR_SYMBOL.search(function))


def parse_log(text: str) -> tuple[list[Record], list[Record]]:
    """Split a memcheck log into (error records, definitely-lost records)."""
    blocks: list[list[str]] = [[]]
    for raw in text.splitlines():
        if not _PREFIX.match(raw):
            continue  # the program's own output, if any reached the log
        line = _PREFIX.sub("", raw, count=1)
        if line.strip():
            blocks[-1].append(line)
        elif blocks[-1]:
            blocks.append([])
    errors, leaks = [], []
    for block in blocks:
        frames = [(m.group(1), m.group(2) or "") for m in map(_FRAME.match, block) if m]
        heads = [ln for ln in block if not _FRAME.match(ln) and not re.match(r"^Thread \d+", ln)]
        if not frames or not heads:
            continue  # banner, summaries
        rec = Record(heads[0].strip(), block, frames)
        if " lost in loss record " in rec.header:
            if "definitely lost" in rec.header:
                leaks.append(rec)
        else:
            errors.append(rec)
    return errors, leaks


def python_binary() -> str:
    """The real interpreter ELF (``python`` may be a pyenv shim script valgrind cannot follow usefully)."""
    exe = os.path.realpath(sys.executable)
    try:
        with open(exe, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        unavailable(f"cannot read the Python interpreter {exe}: {e}")
    if magic != b"\x7fELF":
        unavailable(f"the Python interpreter {exe} is not an ELF binary (a wrapper script?); "
                    "run pytest with the real interpreter so valgrind can trace it")
    return exe


def test_parser_attributes_frames():
    """The log parser itself: a record counts as ours by source file, object or symbol name."""
    log = "\n".join([
        "==7== Memcheck, a memory error detector",
        "==7== ",
        "==7== Thread 2:",
        "==7== Invalid write of size 4",
        "==7==    at 0x1234: rn_rope (cpu_ops.c:88)",
        "==7==    by 0x5678: __pyx_pw_7rustane_4_cpu_5rope (_cpu.pyx.c:4000)",
        "==7==  Address 0x99 is 0 bytes after a block of size 16 alloc'd",
        "==7==    at 0x4848899: malloc (vg_replace_malloc.c:381)",
        "==7== ",
        "==7== Conditional jump or move depends on uninitialised value(s)",
        "==7==    at 0xAB: PyObject_Free (obmalloc.c:1)",
        "==7==    by 0xCD: ??? (in /usr/lib/libpython3.11.so.1.0)",
        "==7== ",
        "==7== 64 bytes in 1 blocks are definitely lost in loss record 3 of 9",
        "==7==    at 0x4848899: malloc (vg_replace_malloc.c:381)",
        "==7==    by 0x1: ??? (in /site-packages/rustane/_native.cpython-311-x86_64-linux-gnu.so)",
        "==7== ",
        "==7== 64 bytes in 1 blocks are possibly lost in loss record 4 of 9",
        "==7==    at 0x4848899: malloc (vg_replace_malloc.c:381)",
        "==7==    by 0x2: rustane_dwq_create (dw_queue.c:10)",
        "==7== ",
        "==7== ERROR SUMMARY: 2 errors from 2 contexts (suppressed: 0 from 0)",
    ])
    errors, leaks = parse_log(log)
    assert [e.header for e in errors] == ["Invalid write of size 4",
                                          "Conditional jump or move depends on uninitialised value(s)"]
    assert errors[0].ours() == ["rn_rope (cpu_ops.c:88)", "__pyx_pw_7rustane_4_cpu_5rope (_cpu.pyx.c:4000)"]
    assert errors[1].ours() == []
    assert len(leaks) == 1 and len(leaks[0].ours()) == 1
    assert not is_our_frame("PyObject_Malloc", "in /home/u/rustane-venv/lib/libpython3.11.so")


def test_native_code_is_valgrind_clean(tmp_path):
    require_tools("valgrind", hint="apt-get install valgrind")
    python = python_binary()
    log = tmp_path / "memcheck.log"
    # The same import path as this process (installed rustane, or a checkout borrowing its extensions).
    pythonpath = os.pathsep.join(p or os.getcwd() for p in sys.path)
    env = dict(os.environ, PYTHONMALLOC="malloc", PYTHONPATH=pythonpath, PYTHONDONTWRITEBYTECODE="1")
    env.pop("RUSTANE_SIMD", None)  # the script picks its paths itself
    cmd = ["valgrind", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite",
           "--show-leak-kinds=definite", "--num-callers=30", f"--log-file={log}",
           python, "-P", str(SCRIPT)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    text = log.read_text(errors="replace") if log.exists() else ""
    # valgrind turns any error (CPython's own included) into exit 99, hiding the script's status:
    # the success line is the script's verdict, the log is valgrind's.
    assert SUCCESS in proc.stdout, (
        f"exercise script failed under valgrind (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}\n"
        f"{text[-4000:]}")
    assert "ERROR SUMMARY" in text, f"no memcheck summary in the valgrind log:\n{text[-4000:]}"

    errors, leaks = parse_log(text)
    ours = [r for r in errors + leaks if r.ours()]
    noise = [r for r in errors + leaks if not r.ours()]
    print(proc.stdout.strip())
    if noise:  # shown with -s / -rA; not ours, so not a failure
        kinds: dict[str, int] = {}
        for r in noise:
            key = re.sub(r"^[\d,]+ (\([\d,]+ direct, [\d,]+ indirect\) )?bytes in [\d,]+ blocks", "N bytes",
                         re.sub(r" of [\d,]+$", "", re.sub(r"loss record [\d,]+", "loss record", r.header)))
            kinds[key] = kinds.get(key, 0) + 1
        print(f"{len(noise)} valgrind records outside rustane's code (CPython/numpy/ld.so startup):")
        for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]):
            print(f"  {n:4d} x {k}")
    if ours:
        report = "\n\n".join("\n".join(r.lines) for r in ours)
        pytest.fail(f"{len(ours)} valgrind record(s) with frames in rustane's native code:\n\n{report}",
                    pytrace=False)
