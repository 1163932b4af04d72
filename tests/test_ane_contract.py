"""Contract tier: the ANE runtime (csrc/ane_runtime.m) against the fake framework (tests/fakeane).

The runtime is compiled with GNUstep + GCC libobjc exactly as written for macOS (manual
retain/release, objc_msgSend cast to exact prototypes); the fake records every selector and
argument kind it receives and checks the rules of docs/ane-runtime.md#call-sequence, docs/ane-runtime.md#surfaces and docs/ane-runtime.md#limits. Its evaluate runs the MIL
through the fp16 simulator, so results must match the sim backend byte for byte.

Two ways this file runs:

- inside a build made with ``-Csetup-args=-Dane_fake=true`` (``rustane._ane`` carries the fake):
  the contract tests below run directly;
- otherwise (the default ``pip install .``): one test builds such a private install into a temp
  prefix (incremental build dir in the user cache) and runs this file there in a subprocess.
"""

from __future__ import annotations

import ctypes
import gc
import importlib.util
import json
import math
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tiers import require_tools, unavailable

REPO = Path(__file__).resolve().parent.parent
INNER_ENV = "RUSTANE_ANE_CONTRACT_INNER"
HINT = "apt-get install clang gnustep-make libgnustep-base-dev libobjc-12-dev"


def _fake_build():
    """(ane backend module, fake library path) when this rustane was built with the fake, else None."""
    try:
        from rustane import _ane
        from rustane.backends import ane
    except ImportError:
        return None
    path = ane.fake_library_path()
    if not _ane.BUILT_WITH_FAKE or path is None:
        return None
    return ane, path


def _hardware() -> bool:
    """On a Mac whose ANE runtime imports (the hardware tier of the macOS workflow)."""
    if sys.platform != "darwin":
        return False
    return importlib.util.find_spec("rustane._ane") is not None


FAKE = _fake_build()
MODE = "fake" if FAKE is not None else ("hardware" if _hardware() else "outer")
#: tests that need the fake's hooks (call log, injected failures); hardware mode drops them
FAKE_ONLY: set[str] = set()
#: tests that run in every mode (no ANE runtime needed)
EVERYWHERE = {"test_runtime_compiles_as_macos_code", "test_probe_cache_round_trip_and_invalidation",
              "test_probe_cli_without_ane_prints_json_and_exits_0"}


def fake_only(fn):
    FAKE_ONLY.add(fn.__name__)
    return fn


# ---- outer mode: build the fake tier and run this file inside it --------------------------------------
def _cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = re.sub(r"[^A-Za-z0-9]+", "_", str(REPO)).strip("_")[-80:]
    return base / "rustane" / f"ane-fake-build-{sys.version_info[0]}{sys.version_info[1]}-{key}"


def _build_fake_tier(prefix: Path) -> tuple[Path, Path]:
    """pip-install this checkout with -Dane_fake=true into ``prefix``; return its site-packages and
    the fake framework, which stays in the build folder (it is never installed)."""
    build_dir = _cache_dir()
    # --ignore-installed: without it pip "upgrades" by uninstalling the rustane this test session
    # is running from before installing into the prefix
    cmd = [sys.executable, "-m", "pip", "install", "--no-deps", "--ignore-installed", "--quiet", "--prefix", str(prefix),
           f"-Cbuild-dir={build_dir}", "-Csetup-args=-Dane_fake=true", str(REPO)]
    if importlib.util.find_spec("mesonpy") is not None:
        cmd.insert(4, "--no-build-isolation")  # build tools present: skip the isolated env (~10 s)
    for attempt in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            break
        if attempt == 0 and build_dir.exists():  # a stale build dir (other meson/python): start clean
            import shutil

            shutil.rmtree(build_dir, ignore_errors=True)
            continue
        pytest.fail(f"building the fake ANE tier failed:\n{' '.join(cmd)}\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}",
                    pytrace=False)
    sites = list(prefix.glob("lib*/python*/site-packages"))
    assert sites, f"no site-packages under {prefix}"
    assert not list(prefix.rglob("libfakeane*")), "the fake framework must not be installed"
    lib = build_dir / "tests" / "fakeane" / "libfakeane.so"
    assert lib.is_file(), f"the -Dane_fake=true build left no {lib}"
    return sites[0], lib


def test_contract_tier(tmp_path_factory):
    """Build rustane with the fake framework and run the contract tests against it."""
    require_tools("clang", "gnustep-config", "gcc", hint=HINT)
    if os.environ.get(INNER_ENV):
        unavailable("the -Dane_fake=true build did not produce rustane._ane, or RUSTANE_ANE_FAKE names no libfakeane.so")
    site, lib = _build_fake_tier(tmp_path_factory.mktemp("ane-fake-prefix"))
    env = dict(os.environ, PYTHONPATH=str(site), **{INNER_ENV: "1", "RUSTANE_ANE_FAKE": str(lib)})
    # the backend protocol tests run there too: the fake build adds the ANE backend to any_backend
    here = Path(__file__).resolve()
    cmd = [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here),
           str(here.parent / "test_backend_protocol.py")]
    # ~4-5 min of contract tests on an idle 2-core machine; room for a loaded one
    r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    out = r.stdout + r.stderr
    assert r.returncode == 0, f"contract tests failed inside the fake build:\n{out[-8000:]}"
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary, summary


# ---- inner mode: the contract tests -----------------------------------------------------------------
HEADER = (
    "program(1.3)\n"
    '[buildInfo = dict<string, string>({{"coremlc-component-MIL", "3510.2.1"}, {"coremlc-version", "3505.4.1"}, '
    '{"coremltools-component-milinternal", ""}, {"coremltools-version", "9.0"}})]\n'
)


def t(shape, dtype="fp16") -> str:
    return f"tensor<{dtype}, [{', '.join(map(str, shape))}]>"


def add_mil(a_shape=(1, 4, 1, 8), b_shape=(1, 4, 1, 8)) -> str:
    """z = a + b (b broadcasts when narrower); inputs deliberately declared b before a."""
    return (HEADER + "{\n"
            f"    func main<ios18>({t(b_shape)} b, {t(a_shape)} a) {{\n"
            f"        {t(a_shape)} z = add(x=a, y=b)[name=string(\"z\")];\n"
            "    } -> (z);\n}\n")


def weighted_mil(c=4, s=8) -> str:
    """y = sigmoid(x * W) with W a BLOBFILE const, plus a second output u = x + x (two outputs)."""
    return (HEADER + "{\n"
            f"    func main<ios18>({t((1, c, 1, s))} x) {{\n"
            f"        {t((1, c, 1, s))} W = const()[name=string(\"W\"), val={t((1, c, 1, s))}"
            "(BLOBFILE(path=string(\"@model_path/weights/w.bin\"), offset=uint64(64)))];\n"
            f"        {t((1, c, 1, s))} m = mul(x=x, y=W)[name=string(\"m\")];\n"
            f"        {t((1, c, 1, s))} y = sigmoid(x=m)[name=string(\"y\")];\n"
            f"        {t((1, c, 1, s))} u = add(x=x, y=x)[name=string(\"u\")];\n"
            "    } -> (y, u);\n}\n")


class Fake:
    """ctypes view of libfakeane.so's test hooks (the same handle the runtime loaded)."""

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        for fn in ("fakeane_log_entry", "fakeane_violation"):
            getattr(lib, fn).restype = ctypes.c_char_p
            getattr(lib, fn).argtypes = [ctypes.c_size_t]
        for fn in ("fakeane_log_count", "fakeane_violation_count"):
            getattr(lib, fn).restype = ctypes.c_size_t
        lib.fakeane_live_objects.restype = ctypes.c_long
        lib.fakeane_fail_next.argtypes = [ctypes.c_char_p, ctypes.c_long, ctypes.c_int]
        lib.fakeane_sha256_hex.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p]
        self.lib = lib

    def sha256_hex(self, data: bytes) -> str:
        out = ctypes.create_string_buffer(65)
        self.lib.fakeane_sha256_hex(data, len(data), out)
        return out.value.decode()

    def reset(self) -> None:
        self.lib.fakeane_reset()

    def log(self) -> list[str]:
        return [self.lib.fakeane_log_entry(i).decode() for i in range(self.lib.fakeane_log_count())]

    def violations(self) -> list[str]:
        return [self.lib.fakeane_violation(i).decode() for i in range(self.lib.fakeane_violation_count())]

    def live(self) -> int:
        gc.collect()
        return self.lib.fakeane_live_objects()

    def fail_next(self, stage: str, code: int, times: int = 1) -> None:
        self.lib.fakeane_fail_next(stage.encode(), code, times)


def renumber(log: list[str]) -> list[str]:
    """Surface ids are process-wide; number them by first appearance so sequences compare."""
    ids: dict[str, str] = {}

    def sub(m):
        return ids.setdefault(m.group(0), f"#{len(ids) + 1}")

    return [re.sub(r"#\d+", sub, line) for line in log]


@pytest.fixture(scope="module")
def fake():
    if MODE != "fake":
        pytest.skip("needs the fake framework (the -Dane_fake=true build)")
    ane, path = FAKE
    os.environ[ane.FAKE_ENV] = path
    reason = ane.unavailable_reason()
    if reason is not None:
        unavailable(f"the fake ANE framework did not load: {reason}")
    return Fake(path)


@pytest.fixture(scope="module")
def hardware_ok():
    """On a Mac: the probe must find a working dialect, else the tier is unavailable (e.g. a VM
    runner without Neural Engine access) and says why."""
    from rustane import probe

    result = probe.probe(cache=False)
    if not result.get("ane") or not result.get("dialect"):
        unavailable(f"no usable Apple Neural Engine here: {json.dumps(result)[:2000]}")
    return result


@pytest.fixture
def backend(request):
    from rustane.backends import get

    if MODE == "hardware":
        request.getfixturevalue("hardware_ok")
        yield get("ane")
        return
    fake = request.getfixturevalue("fake")
    fake.reset()
    before = fake.live()
    yield get("ane")
    assert fake.violations() == [], "\n".join(fake.violations())
    assert fake.live() == before, "fake framework objects leaked (not released or not CFReleased)"


def _tmp_root() -> Path:
    from rustane.backends import get

    k = get("ane").compile(add_mil(), {}, "probe_tmp")
    root = Path(k.tmpdir).parent
    k.close()
    return root


#: the shape of -hexStringIdentifier (docs/ane-rules.md, "model identifier")
MODEL_ID = re.compile(r"[0-9A-F]{64}_[0-9A-F]{64}_[0-9A-F]{64}")


def framework_model_id(mil: str, blobs: dict[str, bytes]) -> str:
    """The identifier as the decompiled framework derives it, computed with hashlib: SHA-256 of the
    MIL bytes, of four zero bytes then each weight's data in key order, and of the (absent) options."""
    import hashlib

    weights = hashlib.sha256(b"\0\0\0\0")
    for key in sorted(blobs):
        weights.update(blobs[key])
    parts = (hashlib.sha256(mil.encode()).hexdigest(), weights.hexdigest(), hashlib.sha256(b"").hexdigest())
    return "_".join(p.upper() for p in parts)


def _leftover_dirs(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if MODEL_ID.fullmatch(p.name))


@fake_only
def test_call_sequence_matches_ane_facts(fake, backend):
    """docs/ane-runtime.md#call-sequence in order: descriptor (NSData MIL, @{} weights, nil options) -> model -> hex id
    -> compile(21, @{}) -> load -> IO objects -> request (7 objects, procedureIndex @0) -> evaluate
    -> unload, with every CPU access inside a lock and outputs read under a read-only lock."""
    k = backend.compile(add_mil(), {}, "add")
    assert [s.name for s in k.inputs] == ["a", "b"]  # name order, not declaration order
    a, b = (k.alloc(s) for s in k.inputs)
    z = k.alloc(k.outputs[0])
    a.write(np.arange(32, dtype=np.float16).reshape(4, 8))
    b.write(np.full((4, 8), 0.5, np.float16))
    req = k.request([a, b], [z])
    req.eval()
    out = z.read()
    k.close()
    del req, a, b, z
    gc.collect()
    np.testing.assert_array_equal(out, np.arange(32, dtype=np.float16).reshape(4, 8) + np.float16(0.5))

    log = renumber(fake.log())
    expected = [
        "+[_ANEInMemoryModelDescriptor modelWithMILText:weights:optionsPlist:] NSData NSDictionary[0] nil",
        "+[_ANEInMemoryModel inMemoryModelWithDescriptor:] _ANEInMemoryModelDescriptor",
        "-[_ANEInMemoryModel hexStringIdentifier]",
        "-[_ANEInMemoryModel compileWithQoS:options:error:] 21 NSDictionary[0] NSError**",
        "-[_ANEInMemoryModel loadWithQoS:options:error:] 21 NSDictionary[0] NSError**",
        "IOSurfaceCreate NSDictionary[6]",
        "+[_ANEIOSurfaceObject objectWithIOSurface:] IOSurfaceRef #1",
        "IOSurfaceCreate NSDictionary[6]",
        "+[_ANEIOSurfaceObject objectWithIOSurface:] IOSurfaceRef #2",
        "IOSurfaceCreate NSDictionary[6]",
        "+[_ANEIOSurfaceObject objectWithIOSurface:] IOSurfaceRef #3",
        "IOSurfaceLock #1 rw", "IOSurfaceGetBaseAddress #1", "IOSurfaceUnlock #1 rw",
        "IOSurfaceLock #2 rw", "IOSurfaceGetBaseAddress #2", "IOSurfaceUnlock #2 rw",
        "+[_ANERequest requestWithInputs:inputIndices:outputs:outputIndices:weightsBuffer:perfStats:procedureIndex:] "
        "NSArray<_ANEIOSurfaceObject>[2] NSArray<NSNumber>[2] NSArray<_ANEIOSurfaceObject>[1] NSArray<NSNumber>[1] "
        "nil nil NSNumber(0)",
        "-[_ANEInMemoryModel evaluateWithQoS:options:request:error:] 21 NSDictionary[0] _ANERequest NSError**",
        "IOSurfaceLock #3 ro", "IOSurfaceGetBaseAddress #3", "IOSurfaceUnlock #3 ro",
        "-[_ANEInMemoryModel unloadWithQoS:error:] 21 NSError**",
    ]
    assert log[: len(expected)] == expected
    assert sorted(log[len(expected):]) == ["CFRelease #1", "CFRelease #2", "CFRelease #3"]


def test_weights_and_temp_dir(backend):
    """Blobs go in as {offset: @0, data: NSData} and as 0600 files in a 0700 temp dir that close() removes."""
    from rustane.mil.blob import write_blob

    w = (np.arange(32, dtype=np.float32).reshape(1, 4, 1, 8) / 16 - 1).astype(np.float16)
    blob = write_blob(w)
    k = backend.compile(weighted_mil(), {"@model_path/weights/w.bin": blob}, "weighted")
    tmp = Path(k.tmpdir)
    assert stat.S_IMODE(tmp.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp / "weights").stat().st_mode) == 0o700
    assert (tmp / "model.mil").read_text() == weighted_mil()
    assert (tmp / "weights" / "w.bin").read_bytes() == blob
    # model.mil is rewritten by the framework's own -saveModelFiles during compile (its mode is then
    # the framework's); the weight file stays the runtime's
    assert stat.S_IMODE((tmp / "weights" / "w.bin").stat().st_mode) == 0o600
    if MODE == "fake":
        assert (tmp / "net.plist").exists()  # written by the fake compiler, must go too
        assert (tmp / "data").read_bytes() == blob  # -saveModelFiles: <hex>/data, must go too
    k.close()
    assert not tmp.exists()
    k.close()  # idempotent


def test_model_id_is_the_frameworks_194_character_identifier(backend):
    """Compile, load and evaluate with the real identifier shape (three SHA-256 digests, 194
    characters), and the temp dir is named by exactly the id the framework derives."""
    from rustane.mil.blob import write_blob

    w = np.linspace(-1, 1, 32, dtype=np.float32).reshape(1, 4, 1, 8).astype(np.float16)
    blobs = {"@model_path/weights/w.bin": write_blob(w)}
    k = backend.compile(weighted_mil(), blobs, "id")
    name = Path(k.tmpdir).name
    assert len(name) == 194 and MODEL_ID.fullmatch(name), name
    assert name == framework_model_id(weighted_mil(), blobs)
    x = k.alloc(k.inputs[0])
    outs = [k.alloc(s) for s in k.outputs]
    x.write(np.ones((4, 8), np.float16))
    k.request([x], outs).eval()
    u = next(o for o, s in zip(outs, k.outputs) if s.name == "u").read()
    np.testing.assert_array_equal(u, np.full((4, 8), 2, np.float16))
    k.close()
    k2 = backend.compile(add_mil(), {}, "noweights")
    assert Path(k2.tmpdir).name == framework_model_id(add_mil(), {})  # hash of 4 zero bytes for no weights
    k2.close()


@fake_only
def test_fake_sha256_matches_hashlib(fake):
    """The fake's own SHA-256 against hashlib, on the FIPS 180-4 examples, block-boundary lengths and
    random data."""
    import hashlib

    from hypothesis import given, settings
    from hypothesis import strategies as st

    cases = [b"", b"abc", b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq", b"\0" * 4]
    cases += [bytes(range(256)) * 3 + b"x" * n for n in (0, 55, 56, 63, 64, 65, 119, 120)]
    for data in cases:
        assert fake.sha256_hex(data) == hashlib.sha256(data).hexdigest().upper(), len(data)

    @settings(max_examples=200, deadline=None)
    @given(st.binary(max_size=3000))
    def same(data):
        assert fake.sha256_hex(data) == hashlib.sha256(data).hexdigest().upper()

    same()


@fake_only
def test_a_temp_dir_another_process_made_is_reused_and_never_deleted(fake, backend):
    """<tmp>/<id> that exists already may be another process's compile of the same program: our
    files are rewritten in place, its files stay, and close() leaves the directory."""
    import shutil

    root = _tmp_root()
    mil = add_mil((1, 6, 1, 8), (1, 6, 1, 8))
    other = root / framework_model_id(mil, {})
    (other / "weights").mkdir(parents=True, mode=0o700)
    other.chmod(0o700)
    (other / "model.mil").write_text("stale")
    (other / "theirs.lock").write_text("in use")
    try:
        k = backend.compile(mil, {}, "shared")
        assert Path(k.tmpdir) == other
        assert (other / "model.mil").read_text() == mil
        k.close()
        assert other.is_dir() and (other / "theirs.lock").read_text() == "in use"
    finally:
        shutil.rmtree(other, ignore_errors=True)


@fake_only
def test_identical_models_share_the_temp_dir_until_the_last_closes(fake, backend):
    k1 = backend.compile(add_mil(), {}, "one")
    k2 = backend.compile(add_mil(), {}, "two")
    assert k1.tmpdir == k2.tmpdir  # content-keyed hex id
    tmp = Path(k1.tmpdir)
    k1.close()
    assert (tmp / "model.mil").exists()
    k2.close()
    assert not tmp.exists()


@fake_only
def test_compile_failure_raises_with_code_and_stage(fake, backend):
    from rustane.backends.ane import AneError

    root = _tmp_root()
    before = _leftover_dirs(root)
    fake.fail_next("compile", 0x1234)
    with pytest.raises(AneError) as ei:
        backend.compile(add_mil((1, 2, 1, 8), (1, 2, 1, 8)), {}, "bad")
    assert (ei.value.code, ei.value.stage) == (0x1234, "compile")
    assert "0x1234" in str(ei.value)
    assert set(_leftover_dirs(root)) <= set(before)  # nothing left behind (earlier kernels may be collected)


@fake_only
def test_load_failure_once_is_retried(fake, backend):
    fake.fail_next("load", 0x50004, 1)
    t0 = time.perf_counter()
    k = backend.compile(add_mil(), {}, "retry")
    assert time.perf_counter() - t0 >= 0.09  # the retry waits ~100 ms for slot reclamation
    loads = [x for x in fake.log() if x.startswith("-[_ANEInMemoryModel loadWithQoS")]
    assert len(loads) == 2
    k.close()


@fake_only
def test_load_failure_twice_raises_0x50004(fake, backend):
    from rustane.backends.ane import AneError

    root = _tmp_root()
    before = _leftover_dirs(root)
    fake.fail_next("load", 0x50004, 2)
    with pytest.raises(AneError) as ei:
        backend.compile(add_mil((1, 3, 1, 8), (1, 3, 1, 8)), {}, "noslot")
    assert (ei.value.code, ei.value.stage) == (0x50004, "load")
    assert "retry" in ei.value.message
    assert set(_leftover_dirs(root)) <= set(before)  # nothing left behind (earlier kernels may be collected)


@fake_only
@pytest.mark.parametrize("code", [0x1D, 0])
def test_eval_failure_raises_and_the_request_stays_usable(fake, backend, code):
    from rustane.backends.ane import AneError

    k = backend.compile(add_mil(), {}, "evalfail")
    bufs = [k.alloc(s) for s in k.inputs + k.outputs]
    req = k.request(bufs[:2], bufs[2:])
    fake.fail_next("eval", code)
    with pytest.raises(AneError) as ei:
        req.eval()
    # code 0: evaluate said NO and left the NSError nil -> the runtime's own code, never silence
    assert (ei.value.code, ei.value.stage) == ((code or -2), "eval")
    req.eval()
    k.close()
    del req, bufs


@fake_only
def test_bad_weight_key_is_rejected_before_the_framework(fake, backend):
    from rustane.backends.ane import AneError

    with pytest.raises(AneError) as ei:
        backend.compile(add_mil(), {"@model_path/../../etc/x.bin": b"\0" * 130}, "evil")
    assert ei.value.stage == "weights"
    assert fake.log() == []


@fake_only
def test_one_model_many_requests_with_inputs_of_different_sizes(fake, backend):
    """The per-layer pattern: one compiled model, one request per input surface, reused. Inputs
    of different sizes are unproven on hardware (the checker refuses them; the probe tries them),
    but the runtime must bind them faithfully."""
    from rustane.backends.ane import AneBackend

    k = AneBackend(check=False).compile(add_mil((1, 4, 1, 8), (1, 4, 1, 1)), {}, "bcast")
    (a_spec, b_spec), (z_spec,) = k.inputs, k.outputs
    assert (a_spec.nbytes, b_spec.nbytes) == (64, 8)
    rng = np.random.default_rng(0)
    layers = []
    for _ in range(3):
        a, b, z = k.alloc(a_spec), k.alloc(b_spec), k.alloc(z_spec)
        a.write(rng.standard_normal((4, 8)).astype(np.float16))
        b.write(rng.standard_normal((4, 1)).astype(np.float16))
        layers.append((a, b, z, k.request([a, b], [z])))
    for _ in range(2):
        for a, b, z, req in layers:
            req.eval()
            want = (a.read().astype(np.float32) + b.read().astype(np.float32)).astype(np.float16)
            np.testing.assert_array_equal(z.read(), want)
    assert sum("requestWithInputs" in x for x in fake.log()) == 3
    k.close()
    del layers


def test_buffers_reject_misuse(backend):
    k = backend.compile(add_mil(), {}, "misuse")
    a, b = (k.alloc(s) for s in k.inputs)
    z = k.alloc(k.outputs[0])
    with z.lock(readonly=True) as view:
        with pytest.raises(ValueError):
            view[0, 0] = 1  # read-only lock -> read-only view
    with pytest.raises(ValueError, match="the kernel has 2"):
        k.request([a], [z])
    req = k.request([a, b], [z])
    with a.lock():
        with pytest.raises(RuntimeError, match="locked"):
            req.eval()  # the ANE must never see a surface the CPU holds
    k.close()
    with pytest.raises(ValueError, match="closed"):
        req.eval()
    del req, a, b, z


@fake_only
def test_fake_detects_rule_breaking(fake):
    """The fake's checks can fail: write through a read-only lock and read the violation back."""
    from rustane import _ane

    fake.reset()
    s = _ane.Surface(16)
    sid = re.search(r"#(\d+)", fake.log()[-1]).group(1)
    base = s.lock().ctypes.data
    s.unlock()
    assert fake.violations() == []
    s.lock(readonly=True)
    ctypes.memset(base, 7, 1)  # bypasses numpy's read-only flag, as C code could
    s.unlock()
    v = fake.violations()
    assert len(v) == 1 and f"IOSurface #{sid} was written while locked read-only" in v[0]
    fake.reset()
    del s


def _sim_and_ane_outputs(backend, mil: str, blobs: dict, inputs: list[np.ndarray]):
    from rustane.backends import get

    results = []
    for be in (get("sim", precision="fp16"), backend):
        k = be.compile(mil, blobs, "equiv")
        ins = [k.alloc(s) for s in k.inputs]
        outs = [k.alloc(s) for s in k.outputs]
        for b, x in zip(ins, inputs):
            b.write(x)
        k.request(ins, outs).eval()
        results.append([o.read() for o in outs])
        k.close()
    return results


def _assert_same(sim: np.ndarray, ane: np.ndarray) -> None:
    """Through the fake: the same bytes. On hardware: within fp16 accumulation differences."""
    assert sim.dtype == ane.dtype == np.float16 and sim.shape == ane.shape
    if MODE == "fake":
        assert sim.tobytes() == ane.tobytes()
    else:
        np.testing.assert_allclose(ane.astype(np.float32), sim.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_fp16_bytes_match_the_sim_backend_weighted(backend):
    from rustane.mil.blob import write_blob

    rng = np.random.default_rng(1)
    w = rng.standard_normal((1, 4, 1, 8)).astype(np.float16)
    x = rng.standard_normal((4, 8)).astype(np.float16)
    sim, ane = _sim_and_ane_outputs(backend, weighted_mil(), {"@model_path/weights/w.bin": write_blob(w)}, [x])
    for s, a in zip(sim, ane):
        _assert_same(s, a)
    # and the numbers are the op's, not just the same garbage twice
    y_ref = 1 / (1 + np.exp(-(x.astype(np.float32) * w.reshape(4, 8).astype(np.float32)).astype(np.float16)
                            .astype(np.float32)))
    np.testing.assert_allclose(ane[1].astype(np.float32), y_ref, atol=2e-3)


def test_fp16_bytes_match_the_sim_backend_sdpa_fwd(backend):
    """A real training kernel (sdpaFwd, with RoPE and mask BLOBFILEs) through the whole ANE path."""
    from rustane import kernels

    spec = kernels.plan_for(dim=16, hidden_dim=32, n_heads=2, n_kv_heads=1, head_dim=8, seq_len=8)["sdpaFwd"]
    mil = kernels.render(spec)
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(spec.in_shape[1:2] + spec.in_shape[3:4]) * 0.5).astype(np.float16)
    sim, ane = _sim_and_ane_outputs(backend, mil, dict(spec.blobs), [x])
    assert len(sim) == len(ane) == 1
    _assert_same(sim[0], ane[0])
    assert np.isfinite(ane[0].astype(np.float32)).all() and np.abs(ane[0].astype(np.float32)).max() > 0


@fake_only
def test_compile_count_and_availability(fake, backend, monkeypatch):
    from rustane.backends import ane

    n = backend.compile_count()
    backend.compile(add_mil((1, 5, 1, 8), (1, 5, 1, 8)), {}, "count").close()
    assert backend.compile_count() == n + 1
    monkeypatch.delenv(ane.FAKE_ENV)
    reason = ane.unavailable_reason()
    assert reason is not None and ane.FAKE_ENV in reason
    with pytest.raises(RuntimeError, match="not available"):
        from rustane.backends import get

        get("ane")


@fake_only
def test_probe_through_the_fake_finds_the_dialect_and_falls_back(fake, backend):
    """The probe's logic on the fake: everything passes; when the ios18 kernel fails to compile
    the probe falls back to the ios16 dialect instead of giving up."""
    from rustane import probe
    from rustane.backends.ane import AneBackend

    be = AneBackend(check=False)
    r = probe.run_probe(be, quick=True)
    assert r["dialect"] == "ios18" and r["dialects_ok"] == ["ios18", "ios16"]
    assert all(c["ok"] for c in r["checks"].values()), r["checks"]
    assert r["min_surface_bytes"] == probe.SURFACE_SIZES[0]
    fake.fail_next("compile", 0x1D, 1)  # the first compile is the ios18 dialect check
    r = probe.run_probe(be, quick=True)
    assert r["dialect"] == "ios16" and not r["checks"]["dialect_ios18"]["ok"]
    assert "0x1d" in r["checks"]["dialect_ios18"]["error"]
    assert r["checks"]["cast"]["ok"]  # the rest ran in the fallback dialect


def _custom(base, **fields):
    import dataclasses

    return dataclasses.replace(base, **fields)


def _probe_profiles():
    """Chip profiles, plus variants the evidence allows (a looser minimum like maderix's 12 KB runs,
    stricter widths), so the probe's record is shown to follow the fake, not the shipped numbers."""
    from rustane.mil import ane_rules

    p = ane_rules.profile
    return {
        "m1-15": p("m1", 15), "m1-26": p("m1", 26), "m3-15": p("m3", 15), "m4-26": p("m4", 26),
        "m5-26": p("m5", 26), "m4-26-strict": p("m4", 26).strict(),
        "m4-26-12KB": _custom(p("m4", 26), min_surface_bytes=12288),
        "m2-15-stricter": _custom(p("m2", 15), min_surface_bytes=65536, width_multiple=32, zero_width=48),
        "m5-26-looser": _custom(p("m5", 26), width_multiple=8, min_width=32, zero_width=16, max_width=32768),
    }


@fake_only
@pytest.mark.filterwarnings("ignore:.*ANE compiles in this process:RuntimeWarning")
@pytest.mark.parametrize("pid", list(_probe_profiles()))
def test_probe_record_matches_the_fake_profiles_evidence(fake, profiled, pid):
    """Under each chip profile the probe records, per rule, exactly what the profile makes the fake
    do (values derived here from the profile's fields), and its dialect/op checks are not fooled by
    the shape limits (every such program is inside them). The profile the cached probe selects
    then never allows what this fake refused."""
    from rustane import probe
    from rustane.backends.ane import AneBackend
    from rustane.mil import ane_rules

    prof = _probe_profiles()[pid]
    profiled(prof)
    r = probe.run_probe(AneBackend(check=False), quick=True)
    rules = r["rules"]
    assert rules["dialect"]["accepted"] == [d for d in probe.DIALECTS if d in prof.dialects]
    assert r["dialect"] == prof.dialects[0]  # found despite the 49 KB / width-64 limits
    assert rules["min-surface"]["accepted_min"] == min(b for b in probe.SURFACE_SIZES if b >= prof.min_surface_bytes)
    below = [t for t in rules["min-surface"]["tested"] if t["value"] < prof.min_surface_bytes]
    assert below and all(t["result"] == "eval-error" for t in below)
    assert rules["min-width"]["accepted_min"] == min(w for w in probe.WIDTHS if w >= max(prof.min_width, prof.zero_width))
    assert rules["zero-width"]["zeros_at"] == [w for w in probe.WIDTHS if w < prof.zero_width]
    assert rules["width-multiple"]["accepted_multiple"] == prof.width_multiple
    fits = [w for w in probe.MAX_WIDTHS if w <= prof.max_width and w <= prof.max_dim]
    assert rules["max-width"]["accepted_max"] == max(fits)
    assert all(t["result"] == "compile-error" for t in rules["max-width"]["tested"] if t["value"] not in fits)
    matmul_ok = "matmul" not in prof.rejected_ops
    assert rules["matmul-op"]["result"] == ("ok" if matmul_ok else "compile-error")
    inner = {t["value"]: t["result"] for t in rules["matmul-inner"]["tested"]}
    if not matmul_ok:
        assert set(inner.values()) == {"compile-error"}
    elif prof.enforces("matmul-inner"):
        assert inner == {64: "ok", 80: "zeros"} and rules["matmul-inner"]["accepted_multiple"] == 32
    else:
        assert inner == {64: "ok", 80: "ok"}
    assert rules["cast-op"]["result"] == ("compile-error" if "cast" in prof.rejected_ops else "ok")
    assert rules["uniform-io-sizes"] == {"equal": "ok", "different": "eval-error"}
    assert r["checks"]["inputs_different_sizes"]["code"] == 0x1D
    assert rules["io-order"] == {"result": "ok"}  # the fake binds by name, and so does the probe's request

    # the profile a cached probe of this Mac selects (its chip named as the fake's profile is)
    chip = prof.chip.upper()
    r["machine"] = dict(r["machine"], chip=f"Apple {chip}", os=f"{prof.os}.1")
    sel = ane_rules.profile_from_probe(r)
    assert sel.min_surface_bytes >= prof.min_surface_bytes and sel.min_width >= prof.min_width
    # every width the fake zeroed or refused stays refused (zero_width up to the ladder's resolution)
    assert sel.zero_width > max(rules["zero-width"]["zeros_at"], default=0) and sel.min_width >= prof.min_width
    assert sel.width_multiple % prof.width_multiple == 0
    assert sel.max_width <= prof.max_width and sel.rejected_ops >= prof.rejected_ops
    assert set(sel.dialects) <= set(prof.dialects)
    if prof.enforces("matmul-inner"):
        assert sel.enforces("matmul-inner")
    base = ane_rules.profile(prof.chip, prof.os)
    if pid in ("m2-15-stricter",):  # measured stricter than the chip's shipped numbers: tightened to them
        assert (sel.min_surface_bytes, sel.width_multiple, sel.zero_width) == (65536, 32, 33)
    if pid in ("m4-26-12KB", "m5-26-looser"):  # measured looser: never loosened
        assert sel == base
    # guards then refuse what this fake refused: tiny's 49,152-byte tensors on a 64 KB-minimum Mac
    from rustane import ane_guard
    from rustane.config import preset

    if sel.min_surface_bytes > 49152:
        with pytest.raises(ane_guard.AneRuleError, match="min-surface"):
            ane_guard.require_config(preset("tiny"), sel)


def test_probe_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    from rustane import probe
    from rustane.backends.ane import probe_cache

    path = tmp_path / "probe.json"
    assert probe.load_cached_probe(path) is None
    result = {"cache_version": probe.CACHE_VERSION, "machine": probe.machine_key(), "ane": True, "dialect": "ios16"}
    probe.save_probe(result, path)
    assert probe.load_cached_probe(path) == result
    other = dict(probe.machine_key(), os="0.0-other")
    # an OS update invalidates the cache (the cache module is the backend's; the probe re-exports it)
    monkeypatch.setattr(probe_cache, "machine_key", lambda: other)
    assert probe.load_cached_probe(path) is None
    path.write_text("{not json")
    assert probe.load_cached_probe(path) is None


def test_probe_cli_without_ane_prints_json_and_exits_0():
    if sys.platform == "darwin":
        pytest.skip("on a Mac the probe talks to the real framework (the macOS workflow runs it)")
    env = {k: v for k, v in os.environ.items() if k != "RUSTANE_ANE_FAKE"}
    r = subprocess.run([sys.executable, "-m", "rustane.probe", "--json", "--no-cache"], capture_output=True,
                       text=True, env=env, cwd=REPO if MODE == "outer" else None, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ane"] is False and "not macOS" in out["reason"]


@fake_only
def test_simulator_errors_surface_with_their_cause(fake, backend):
    """A program the fake's simulator cannot run (a BLOBFILE nobody supplied, unchecked) fails at
    eval with the simulator's own message chained, not an anonymous code."""
    from rustane.backends.ane import AneBackend, AneError

    k = AneBackend(check=False).compile(weighted_mil(), {}, "noblob")
    bufs = [k.alloc(s) for s in k.inputs + k.outputs]
    with pytest.raises(AneError) as ei:
        k.request(bufs[:1], bufs[1:]).eval()
    assert ei.value.stage == "eval" and "w.bin" in str(ei.value) and ei.value.__cause__ is not None
    k.close()
    del bufs, ei  # the traceback holds the request and its surfaces


@fake_only
def test_training_through_the_fake_is_bit_identical_to_sim_fp16(fake, tmp_path):
    """The issue's end-to-end contract: ``train --backend ane`` on the fake framework writes the
    same checkpoint bytes as ``--backend sim --precision fp16`` (a few steps; the default 400 were
    checked by hand: identical too)."""
    if importlib.util.find_spec("rustane.train") is None:
        pytest.skip("the training CLI (rustane.train) is not in this build")
    ane, path = FAKE
    common = ["-P", "-m", "rustane.train", "--preset", "tiny", "--steps", "4", "--eval-every", "0",
              "--sample", "0", "--no-progress", "--seed", "3"]
    runs = {"sim": ["--backend", "sim", "--precision", "fp16"], "ane": ["--backend", "ane"]}
    for name, extra in runs.items():
        env = dict(os.environ, **{ane.FAKE_ENV: path, "RUSTANE_CACHE": str(tmp_path / "cache")})
        r = subprocess.run([sys.executable, *common, *extra, "--out", str(tmp_path / name)], env=env,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, f"{name}: {r.stdout[-2000:]}\n{r.stderr[-4000:]}"
    state = json.loads(next((tmp_path / "ane").glob("step-*/trainer_state.json")).read_text())
    assert state["backend"] == "ane"
    from safetensors import safe_open

    for f in ("model.safetensors", "optimizer.safetensors"):
        (sim_f,) = (tmp_path / "sim").glob(f"step-*/{f}")
        (ane_f,) = (tmp_path / "ane").glob(f"step-*/{f}")
        # Tensor bytes and metadata, not file bytes: safetensors writes the metadata map in no
        # fixed order, so even two sim runs differ in the header.
        with safe_open(str(sim_f), "np") as a, safe_open(str(ane_f), "np") as b:
            assert a.metadata() == b.metadata()
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                x, y = a.get_tensor(key), b.get_tensor(key)
                assert x.dtype == y.dtype and x.shape == y.shape
                assert x.tobytes() == y.tobytes(), f"{f}: {key} differs between sim fp16 and ane (fake)"


def test_runtime_compiles_as_macos_code(tmp_path):
    """csrc/ane_runtime.m's __APPLE__ branch, syntax-checked on Linux: Apple-style stubs declare
    objc_msgSend as void(void) (as the SDK does), so an uncast message send is a compile error;
    the IOSurface calls are checked against the SDK's prototypes (tests/fakeane/apple_stubs)."""
    if sys.platform == "darwin":
        pytest.skip("on macOS the real build compiles this file")
    require_tools("clang", "gnustep-config", "gcc", hint=HINT)
    gcc_dir = Path(subprocess.run(["gcc", "-print-file-name=libobjc.so"], capture_output=True, text=True,
                                  check=True).stdout.strip()).parent
    flags = [f for f in subprocess.run(["gnustep-config", "--objc-flags"], capture_output=True, text=True,
                                       check=True).stdout.split()
             if f.startswith(("-D", "-I", "-fconstant-string-class", "-fobjc-exceptions"))]
    stubs = REPO / "tests" / "fakeane" / "apple_stubs"
    base = ["clang", "-fsyntax-only", "-std=c11", "-fobjc-runtime=gcc", "-fno-objc-arc", f"-I{stubs}", *flags,
            f"-I{gcc_dir / 'include'}", f"-I{REPO / 'csrc'}", "-Wall", "-Wextra", "-Werror",
            "-Wno-incompatible-library-redeclaration"]
    # macOS headers expose POSIX by default; glibc needs _GNU_SOURCE for the same view
    apple = base + ["-D__APPLE__", "-D_GNU_SOURCE"]
    r = subprocess.run(apple + [str(REPO / "csrc" / "ane_runtime.m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    r = subprocess.run(base + [str(REPO / "csrc" / "ane_runtime.m")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the stub really rejects what it is there to reject
    bad = tmp_path / "uncast.m"
    bad.write_text("#include <objc/message.h>\n#import <Foundation/Foundation.h>\n"
                   "void f(id o) { objc_msgSend(o, @selector(description)); }\n")
    r = subprocess.run(apple + [str(bad)], capture_output=True, text=True)
    assert r.returncode != 0 and "too many arguments" in r.stderr


def _double_mil(c: int, w: int, dialect: str = "ios18") -> str:
    """z = x + x on [1, c, 1, w]; in the ios16 spelling when asked (docs/ane-rules.md#dialect)."""
    text = (HEADER + "{\n"
            f"    func main<ios18>({t((1, c, 1, w))} x) {{\n"
            f"        {t((1, c, 1, w))} z = add(x=x, y=x)[name=string(\"z\")];\n"
            "    } -> (z);\n}\n")
    if dialect == "ios16":
        from rustane.mil import emit, parse
        from rustane.mil.dialect import to_dialect

        text = emit(to_dialect(parse(text), "ios16"))
    return text


def _matmul_mil(k: int) -> str:
    """[1,1,192,k] @ [1,1,k,192]: contracts over k (every surface above the minimum)."""
    return (HEADER + "{\n"
            f"    func main<ios18>({t((1, 1, 192, k))} a, {t((1, 1, 192, k))} b) {{\n"
            "        bool bF = const()[name=string(\"bF\"), val=bool(false)];\n"
            "        bool bT = const()[name=string(\"bT\"), val=bool(true)];\n"
            f"        {t((1, 1, 192, 192))} z = matmul(transpose_x=bF, transpose_y=bT, x=a, y=b)[name=string(\"z\")];\n"
            "    } -> (z);\n}\n")


def _run_double(backend, c, w, mil=None):
    k = backend.compile(mil or _double_mil(c, w), {}, "rule")
    x = k.alloc(k.inputs[0])
    z = k.alloc(k.outputs[0])
    data = (np.arange(c * w) % 251 / 64 - 2).astype(np.float16).reshape(c, w)
    x.write(data)
    req = k.request([x], [z])
    try:
        req.eval()
        return data * np.float16(2), z.read()
    finally:
        del req
        k.close()


@pytest.fixture
def profiled(fake, request):
    """install(profile) -> the hook; removed after the test (tests/fake_profiles.py)."""
    import fake_profiles

    def install(profile):
        return fake_profiles.install(FAKE[1], profile)

    yield install
    fake_profiles.uninstall()


PROFILE_IDS = [f"{c}-{o}" for c in ("m1", "m2", "m3", "m4", "m5") for o in (15, 26)]


@fake_only
@pytest.mark.parametrize("pid", PROFILE_IDS)
def test_fake_behaves_like_the_evidence_for_each_profile(fake, profiled, pid):
    """For every chip profile, a program breaking each shape rule gets what docs/ane-rules.md says the
    hardware does (0x1d, zeros, corrupted columns, compile rejection); a program inside the rules
    evaluates correctly. The guards refuse these shapes first (tests/test_ane_guard.py)."""
    from rustane.backends.ane import AneBackend, AneError
    from rustane.mil import ane_rules

    chip, os_major = pid.split("-")
    prof = ane_rules.profile(chip, int(os_major))
    hook = profiled(prof)
    dialect = prof.dialects[0]
    be = AneBackend(check=False, dialect=dialect)
    # inside every rule: exact
    want, got = _run_double(be, 384, 64)
    np.testing.assert_array_equal(got, want)
    # min-surface: 16 x 64 fp16 = 2 KB -> 0x1d at eval
    with pytest.raises(AneError) as ei:
        _run_double(be, 16, 64)
    assert (ei.value.code, ei.value.stage) == (0x1D, "eval")
    # min-width: width 48 (>= 32) -> 0x1d
    with pytest.raises(AneError) as ei:
        _run_double(be, 1024, 48)
    assert ei.value.code == 0x1D
    # zero-width: width 16 fp16 -> silent zeros, no error
    want, got = _run_double(be, 2048, 16)
    assert np.abs(want).max() > 0 and not got.any()
    # width-multiple: width 200 -> silently wrong columns, no error
    want, got = _run_double(be, 128, 200)
    bad = np.nonzero((got != want).any(axis=0))[0]
    assert bad.size and bad.min() >= 192  # the tail past the last whole group of 16
    # max-width: width 16,400 -> compile rejected
    with pytest.raises(AneError) as ei:
        be.compile(_double_mil(2, 16400), {}, "wide")
    assert (ei.value.code, ei.value.stage) == (ane_rules.FAKE_COMPILE_REJECTED, "compile")
    rules_seen = {e[0] for e in hook.events}
    assert {"min-surface", "min-width", "zero-width", "width-multiple", "max-width"} <= rules_seen
    assert "hook-error" not in rules_seen, hook.events



def _io_order_mil() -> str:
    """Inputs declared (x, b), outputs returned (y, p): both out of alphabetical order, every surface
    [1, 384, 1, 64] fp16 = 49,152 bytes (inside min-surface, min-width, width-multiple and
    uniform-io-sizes, so io-order is the only rule in play). y = x - b, p = x * b."""
    s = (1, 384, 1, 64)
    return (HEADER + "{\n"
            f"    func main<ios18>({t(s)} x, {t(s)} b) {{\n"
            f"        {t(s)} y = sub(x=x, y=b)[name=string(\"y\")];\n"
            f"        {t(s)} p = mul(x=x, y=b)[name=string(\"p\")];\n"
            "    } -> (y, p);\n}\n")


def _io_order_data():
    """Small integers, so x - b, b - x and x * b are exact in fp16 and any swap shows."""
    r = np.random.default_rng(3)
    x = r.integers(-8, 9, (384, 64)).astype(np.float16)
    b = r.integers(1, 5, (384, 64)).astype(np.float16)
    return x, b


@fake_only
@pytest.mark.filterwarnings("ignore:.*ANE compiles in this process:RuntimeWarning")
@pytest.mark.parametrize("pid", PROFILE_IDS)
def test_io_order_broken_on_purpose_gives_silently_wrong_outputs_and_the_runtime_never_binds_so(fake, profiled, pid):
    """docs/ane-rules.md#io-order (Orion, M4 Max): a request's surfaces bind to the program's inputs
    and outputs in alphabetical order of their MIL names, not in declaration order; binding in
    declaration order gives wrong numbers and no error.

    Under every chip profile: (a) a request built in declaration order (x, b) -> (y, p), straight on
    the native runtime, evaluates without error and returns b - x where y should be and x * b where
    we read y, exactly the swap the rule predicts, checked against numpy; (b) the runtime's own
    request binds in name order and computes x - b and x * b exactly, and it refuses the
    declaration-order buffers with an error naming the rule and the document."""
    from rustane import _ane
    from rustane.backends.ane import AneBackend
    from rustane.mil import ane_rules

    chip, os_major = pid.split("-")
    prof = ane_rules.profile(chip, int(os_major))
    hook = profiled(prof)
    be = AneBackend(check=False, dialect=prof.dialects[0])
    k = be.compile(_io_order_mil(), {}, "ioorder")
    try:
        assert [s.name for s in k.inputs] == ["b", "x"] and [s.name for s in k.outputs] == ["p", "y"]
        buf = {s.name: k.alloc(s) for s in k.inputs + k.outputs}
        x, b = _io_order_data()
        buf["x"].write(x)
        buf["b"].write(b)
        x64, b64 = x.astype(np.float64), b.astype(np.float64)
        # (a) declaration order, as a runtime that trusted the text would bind it
        native = _ane.Request(k._model, [buf["x"].surface, buf["b"].surface], [buf["y"].surface, buf["p"].surface])
        native.eval()
        got_y, got_p = buf["y"].read().astype(np.float64), buf["p"].read().astype(np.float64)
        assert not np.array_equal(got_y, x64 - b64) and not np.array_equal(got_p, x64 * b64)
        np.testing.assert_array_equal(got_y, x64 * b64)  # the surface bound first got p
        np.testing.assert_array_equal(got_p, b64 - x64)  # y, computed with x and b swapped
        del native
        # (b) the runtime binds by name and gets it right
        req = k.request([buf[s.name] for s in k.inputs], [buf[s.name] for s in k.outputs])
        req.eval()
        np.testing.assert_array_equal(buf["y"].read().astype(np.float64), x64 - b64)
        np.testing.assert_array_equal(buf["p"].read().astype(np.float64), x64 * b64)
        del req
        with pytest.raises(ValueError, match=r"io-order.*docs/ane-rules\.md#io-order"):
            k.request([buf["x"], buf["b"]], [buf["p"], buf["y"]])
        with pytest.raises(ValueError, match=r"output 0 is the buffer of 'y'.*io-order"):
            k.request([buf["b"], buf["x"]], [buf["y"], buf["p"]])
    finally:
        k.close()
    assert hook.events == []  # silent: no profile rule fired, the wrong numbers came with no error


def _reshape_mil(c: int, w: int, inner: tuple) -> str:
    """x [1,c,1,w] reshaped to ``inner`` and back, doubled: I/O stays [1,c,1,w], one tensor inside
    the program has ``inner``'s dims (docs/ane-rules.md#max-dim)."""
    dims = ", ".join(map(str, inner))
    return (HEADER + "{\n"
            f"    func main<ios18>({t((1, c, 1, w))} x) {{\n"
            f"        tensor<int32, [4]> s1 = const()[name=string(\"s1\"), val=tensor<int32, [4]>([{dims}])];\n"
            f"        tensor<int32, [4]> s2 = const()[name=string(\"s2\"), val=tensor<int32, [4]>([1, {c}, 1, {w}])];\n"
            f"        {t(inner)} r = reshape(shape=s1, x=x)[name=string(\"r\")];\n"
            f"        {t((1, c, 1, w))} b = reshape(shape=s2, x=r)[name=string(\"b\")];\n"
            f"        {t((1, c, 1, w))} z = add(x=b, y=b)[name=string(\"z\")];\n"
            "    } -> (z);\n}\n")


@fake_only
@pytest.mark.parametrize("pid", ["m1-15", "m2-26", "m3-15", "m5-26"])
def test_fake_rejects_an_inner_dimension_over_the_profiles_max_dim(fake, profiled, pid):
    """max-dim on purpose: I/O [1,4,1,8192] (inside every I/O rule) with a [1,1,1,32768] tensor
    inside. M1/M2 (16,384) reject it at compile; M3+ (65,536) run it correctly. The guard's
    refusal of such configs is tested in tests/test_ane_guard.py."""
    from rustane.backends.ane import AneBackend, AneError
    from rustane.mil import ane_rules

    chip, os_major = pid.split("-")
    prof = ane_rules.profile(chip, int(os_major))
    hook = profiled(prof)
    be = AneBackend(check=False, dialect=prof.dialects[0])
    mil = _reshape_mil(4, 8192, (1, 1, 1, 32768))
    if 32768 > prof.max_dim:
        with pytest.raises(AneError) as ei:
            be.compile(mil, {}, "maxdim")
        assert (ei.value.code, ei.value.stage) == (ane_rules.FAKE_COMPILE_REJECTED, "compile")
        assert [e[0] for e in hook.events] == ["max-dim"]
    else:
        want, got = _run_double(be, 4, 8192, mil)
        np.testing.assert_array_equal(got, want)
        assert hook.events == []


@fake_only
def test_ane_backend_guards_with_the_probed_profile(fake, tmp_path, monkeypatch):
    """No cached probe: the conservative profile; a cached probe of an M1 on macOS 26: that profile,
    under which the guard refuses the matmul kernels before anything compiles."""
    from rustane import ane_guard, probe
    from rustane.backends.ane import AneBackend
    from rustane.config import preset
    from rustane.mil import ane_rules

    from rustane.backends.ane import probe_cache

    monkeypatch.setattr(probe_cache, "cache_path", lambda: tmp_path / "probe.json")
    assert AneBackend().ane_profile == ane_rules.CONSERVATIVE
    machine = dict(probe.machine_key(), chip="Apple M1", os="26.1")
    monkeypatch.setattr(probe_cache, "machine_key", lambda: machine)
    probe.save_probe({"cache_version": probe.CACHE_VERSION, "machine": machine, "ane": True, "dialect": "ios16"})
    be = AneBackend()
    assert be.ane_profile == ane_rules.profile("m1", 26) and be.dialect == "ios16"
    with pytest.raises(ane_guard.AneRuleError, match="matmul-op"):
        ane_guard.require_config(preset("tiny"), ane_guard.backend_profile(be))


@fake_only
def test_fake_rejects_what_m1_m2_on_macos26_reject(fake, profiled):
    from rustane.backends.ane import AneBackend, AneError
    from rustane.mil import ane_rules

    profiled(ane_rules.profile("m1", 26))
    with pytest.raises(AneError) as ei:  # dialect: program(1.3) text
        AneBackend(check=False, dialect="ios18").compile(_double_mil(384, 64), {}, "d")
    assert ei.value.stage == "compile"
    want, got = _run_double(AneBackend(check=False, dialect="ios16"), 384, 64)
    np.testing.assert_array_equal(got, want)
    with pytest.raises(AneError):  # matmul-op
        AneBackend(check=False, dialect="ios16").compile(_matmul_mil(384), {}, "mm")
    profiled(ane_rules.profile("m1", 15))
    AneBackend(check=False, dialect="ios18").compile(_matmul_mil(384), {}, "mm").close()


@fake_only
def test_fake_strict_profile_zeroes_flagged_matmul_inner_dims(fake, profiled):
    from rustane.backends.ane import AneBackend
    from rustane.mil import ane_rules

    profiled(ane_rules.profile("m4", 26).strict())
    be = AneBackend(check=False)
    rng = np.random.default_rng(0)
    for k_dim, zeros in ((384, False), (400, True)):
        k = be.compile(_matmul_mil(k_dim), {}, "mm")
        a, b = (rng.standard_normal((1, 192, k_dim)).astype(np.float16) for _ in range(2))
        bufs = [k.alloc(s) for s in k.inputs]
        for buf, x in zip(bufs, (a, b)):
            buf.write(x.reshape(buf.spec.view_shape))
        z = k.alloc(k.outputs[0])
        req = k.request(bufs, [z])
        req.eval()
        out = z.read()
        del req
        k.close()
        assert (not out.any()) == zeros, k_dim


@fake_only
def test_fake_compile_budget_fails_load_with_0x50004(fake, profiled):
    import dataclasses

    from rustane.backends.ane import AneBackend, AneError
    from rustane.mil import ane_rules

    profiled(dataclasses.replace(ane_rules.profile("m4", 26), compile_budget=3))
    be = AneBackend(check=False)
    for i in range(3):
        be.compile(_double_mil(384 + 16 * i, 64), {}, "b").close()
    with pytest.raises(AneError) as ei:
        be.compile(_double_mil(512, 64), {}, "b")
    assert (ei.value.code, ei.value.stage) == (0x50004, "load")


def _kernel_texts(preset_name="tiny"):
    """name -> MIL text of every training kernel of a preset, rendered here from the plan."""
    from rustane import models
    from rustane.config import preset
    from rustane.runtime.plan import render

    cfg = preset(preset_name)
    family = models.family_for(cfg)
    plan = family.plan_for(family.kernel_shape(cfg, "fp16"))
    return {name: render(spec) for name, spec in plan.items()}, plan


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


@fake_only
@pytest.mark.parametrize("victim", ["sdpaBwd1", "ffnFused"])
def test_selfcheck_catches_one_silently_corrupted_kernel(fake, tmp_path, monkeypatch, victim):
    """The fake returns one wrong element from ONE kernel (FAKEANE_CORRUPT): building the model on
    the ANE stops with that kernel, the element the fake changed (its index computed here from the
    fake's rule, value 100) and the way out; nothing is cached as a pass."""
    from rustane.engine import Engine
    from rustane.selfcheck import SelfCheckError

    texts, plan = _kernel_texts()
    assert len({_sha(t) for t in texts.values()}) == len(texts)  # the hash names exactly one kernel
    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path))
    monkeypatch.setenv("FAKEANE_CORRUPT", _sha(texts[victim]))
    with pytest.raises(SelfCheckError) as ei:
        Engine("tiny", backend="ane", seed=0)
    err = ei.value
    assert [f.kernel for f in err.failed] == [victim]
    _, c, _, s = plan[victim].out_shape
    at = (2 * c * s) // 3  # fakeane.m corrupt_if_asked: two thirds into the first output
    idx, got, want = err.failed[0].worst
    assert idx == (at // s, at % s) and got == 100.0 and abs(want) < 10
    msg = str(err)
    assert f"kernel {victim}" in msg and "--backend sim" in msg and "python -m rustane.doctor" in msg
    assert "\n" not in msg
    assert [p.name for p in (tmp_path / "selfcheck").iterdir() if not p.name.endswith(".failed.json")] == []
    (failed,) = (tmp_path / "selfcheck").glob("*.failed.json")
    rec = json.loads(failed.read_text())
    assert {k["kernel"]: k["ok"] for k in rec["kernels"]} == {n: n != victim for n in plan}


@fake_only
def test_selfcheck_passes_clean_kernels_and_a_cached_pass_skips_it(fake, tmp_path, monkeypatch):
    """Nothing injected: every kernel passes and the pass is cached under RUSTANE_CACHE. The second
    build skips the check: even a corruption injected now goes unnoticed (that is what the cache
    means: this chip + OS + kernel text were proven). Another OS version checks again."""
    from rustane.backends.ane import probe_cache
    from rustane.engine import Engine
    from rustane.selfcheck import SelfCheckError

    texts, plan = _kernel_texts()
    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path))
    monkeypatch.delenv("FAKEANE_CORRUPT", raising=False)
    eng = Engine("tiny", backend="ane", seed=0)
    rec = eng.model.selfcheck
    eng.model.close()
    assert rec["ok"] and not rec["cached"]
    assert [k["kernel"] for k in rec["kernels"]] == list(plan)
    assert all(k["ok"] and k["max_abs_err"] == 0.0 for k in rec["kernels"])  # the fake is bit-identical
    (cached,) = (tmp_path / "selfcheck").glob("*.json")
    assert json.loads(cached.read_text())["key"] == cached.stem
    monkeypatch.setenv("FAKEANE_CORRUPT", _sha(texts["sdpaFwd"]))
    eng = Engine("tiny", backend="ane", seed=0)
    assert eng.model.selfcheck["cached"] is True
    eng.model.close()
    other = dict(probe_cache.machine_key(), os="99.0-other")
    monkeypatch.setattr(probe_cache, "machine_key", lambda: other)
    with pytest.raises(SelfCheckError, match="kernel sdpaFwd"):
        Engine("tiny", backend="ane", seed=0)


@fake_only
def test_training_cli_stops_on_a_selfcheck_mismatch_with_one_error_line(fake, tmp_path):
    """``train --backend ane`` on a corrupted kernel: exit status 2 (an expected failure,
    rustane.cli), one ``error:`` line naming the kernel and the way out, no traceback, no checkpoint."""
    if importlib.util.find_spec("rustane.train") is None:
        pytest.skip("the training CLI (rustane.train) is not in this build")
    ane, path = FAKE
    texts, _ = _kernel_texts()
    env = dict(os.environ, **{ane.FAKE_ENV: path, "RUSTANE_CACHE": str(tmp_path / "cache"),
                              "FAKEANE_CORRUPT": _sha(texts["wotBwd"])})
    r = subprocess.run([sys.executable, "-P", "-m", "rustane.train", "--preset", "tiny", "--steps", "2",
                        "--eval-every", "0", "--sample", "0", "--no-progress", "--backend", "ane",
                        "--out", str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ANE self-check: kernel wotBwd"), r.stderr
    assert "Traceback" not in r.stderr and "--backend sim" in lines[0]
    assert not list((tmp_path / "run").glob("step-*"))


def _doctor_in_fake_build(tmp_path, **env_extra):
    """Run ``python -m rustane.doctor --json`` in this fake build, letting it find the fake itself."""
    env = {k: v for k, v in os.environ.items() if k not in ("RUSTANE_ANE_FAKE", "FAKEANE_CORRUPT")}
    env.update(RUSTANE_CACHE=str(tmp_path / "cache"), **env_extra)
    r = subprocess.run([sys.executable, "-P", "-m", "rustane.doctor", "--json", "--out", str(tmp_path / "doc")],
                       env=env, capture_output=True, text=True, timeout=600)
    rep = json.loads((tmp_path / "doc" / "doctor.json").read_text()) if (tmp_path / "doc" / "doctor.json").exists() else None
    return r, rep


@fake_only
def test_doctor_through_the_fake_ane_checks_every_kernel_and_trains_bit_identically(fake, tmp_path):
    """The doctor on a -Dane_fake=true build: probe, every kernel self-checked (exact through the
    fake), 3 steps on the fake ANE identical to the fp16 simulator; every field documented."""
    from doctor_fields import undocumented

    r, rep = _doctor_in_fake_build(tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert rep["status"] == "ok" and rep["problems"] == []
    assert rep["ane"] == {"available": True, "reason": None, "fake_framework": True}
    assert rep["probe"]["dialect"] == "ios18" and rep["probe"]["checks"]
    texts, plan = _kernel_texts()
    assert [k["name"] for k in rep["kernels"]] == list(plan)
    assert all(k["status"] == "ok" and k["max_abs_err"] == 0.0 and k["backend"] == "ane" for k in rep["kernels"])
    runs = {x["name"]: x for x in rep["training"]["runs"]}
    assert set(runs) == {"ane", "sim-fp16", "sim-fp32"}
    assert runs["ane"]["losses"] == runs["sim-fp16"]["losses"]
    (d,) = [d for d in rep["training"]["differences"] if d["a"] == "ane"]
    assert d["identical"] and d["max_weight_diff"] == 0.0
    assert undocumented(rep) == []


@fake_only
def test_doctor_reports_the_one_corrupted_kernel_and_exits_3(fake, tmp_path):
    texts, plan = _kernel_texts()
    r, rep = _doctor_in_fake_build(tmp_path, FAKEANE_CORRUPT=_sha(texts["ffnBwdW2t"]))
    assert r.returncode == 3, r.stderr[-3000:]
    assert rep["status"] == "problems"
    status = {k["name"]: k["status"] for k in rep["kernels"]}
    assert status == {n: ("mismatch" if n == "ffnBwdW2t" else "ok") for n in plan}
    bad = next(k for k in rep["kernels"] if k["name"] == "ffnBwdW2t")
    _, c, _, s = plan["ffnBwdW2t"].out_shape
    assert bad["worst"]["index"] == [(2 * c * s) // 3 // s, (2 * c * s) // 3 % s] and bad["worst"]["got"] == 100.0
    assert any("kernel ffnBwdW2t" in p for p in rep["problems"])
    ane_run = next(x for x in rep["training"]["runs"] if x["name"] == "ane")
    assert "self-check" in ane_run["error"] and ane_run["losses"] == []
    assert "mismatch" in (tmp_path / "doc" / "doctor.md").read_text()


#: presets trained one step at full depth through the fake: on every profile that allows them (None),
#: or on the one profile named (a different one each, so the old and new chip generations and both
#: macOS majors all run a full model). Every preset also trains at full width and two layers on every
#: allowed profile (test_every_preset_at_full_width_trains_on_every_allowed_profile).
#: qwen3-0.6b is not trained at full depth: building and stepping it once took ~46 s (init 33 s, step
#: 13 s) and 13.6 GB max RSS on the fp16 simulator on the 2-core CI machine, and the test needs it
#: twice (reference + fake). Re-measure: /usr/bin/time -v python -c "import numpy as np; from
#: rustane.config import preset; from rustane.engine import Engine; e = Engine(preset('qwen3-0.6b'),
#: backend='sim', precision='fp16', seed=1); t = np.zeros((1, 257), int); e.train_step((t[:, :-1], t[:, 1:]))"
TRAIN_THROUGH_FAKE = {"tiny": None, "stories15m": None, "stories42m": "m4-26", "stories110m": "m1-15",
                      "smollm2-135m": "m5-15"}
#: the truncation that keeps every ANE program of a preset: depth and vocabulary never reach a kernel
TRUNCATED = dict(n_layers=2, vocab_size=512)


def _one_step(eng, tokens):
    """(loss, SHA-256 of every parameter after one step): digests, not copies, so a full-depth model
    (stories110m: 110 M parameters) is not held twice while the next one trains."""
    import hashlib

    st = eng.train_step((tokens[None, :-1], tokens[None, 1:]))
    params = {k: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for k, v in eng.model.params.items()}
    eng.model.close()
    return st.loss, params


def _allowed_profiles(cfg) -> dict:
    from rustane import ane_guard
    from rustane.mil import ane_rules

    profiles = {f"{p.chip}-{p.os}": p for p in ane_rules.all_profiles()}
    return {pid: p for pid, p in profiles.items() if not [b for b in ane_guard.config_breaches(cfg, p) if b.enforced]}


def _train_through_fake(profiled, cfg, profiles: dict, seed_tokens: int = 5) -> None:
    """One step of ``cfg`` on the fp16 simulator, then through the fake under each profile: the loss
    and every parameter after the step must be bit-identical, and the fake must have seen no rule
    broken (its hook records every breach it simulates)."""
    import fake_profiles

    from rustane.backends.ane import AneBackend
    from rustane.engine import Engine

    tokens = np.random.default_rng(seed_tokens).integers(0, cfg.vocab_size, cfg.seq_len + 1)
    want_loss, want = _one_step(Engine(cfg, backend="sim", precision="fp16", seed=1), tokens)
    assert np.isfinite(want_loss)
    for pid, prof in sorted(profiles.items()):
        hook = profiled(prof)
        loss, got = _one_step(Engine(cfg, backend=AneBackend(dialect=prof.dialects[0]), seed=1), tokens)
        assert loss == want_loss, pid
        assert got == want, (pid, sorted(k for k in want if got.get(k) != want[k]))
        assert hook.events == [], (pid, hook.events)
        fake_profiles.uninstall()


@fake_only
@pytest.mark.filterwarnings("ignore:.*ANE compiles in this process:RuntimeWarning")
@pytest.mark.parametrize("name", ["tiny", "stories15m", "stories42m", "stories110m", "smollm2-135m", "qwen3-0.6b"])
def test_every_preset_runs_through_the_fake_on_every_profile_its_rules_allow(fake, profiled, tmp_path, monkeypatch,
                                                                             name):
    """docs/ane-rules.md: every preset passes every rule on every chip profile except the matmul-less
    M1/M2 + macOS 26, where the guard refuses it and the fake refuses its kernels at compile too.

    Where allowed, under each profile: every kernel compiles through the fake (its compile-time
    rules: dialect, ops, maximum width and dimension), the fake's eval-time rules (minimum surface,
    widths, equal I/O sizes) pass on every kernel's real surface sizes, and one kernel (every kernel
    on the first profile) evaluates bit-identically to the fp16 simulator. The presets of
    TRAIN_THROUGH_FAKE also train one step at full depth through the fake (tiny and stories15m on
    every allowed profile, the others on the one profile named), bit-identical to the fp16
    simulator: loss and every weight. Every preset trains on every allowed profile at full width in
    test_every_preset_at_full_width_trains_on_every_allowed_profile."""
    import fake_profiles

    from rustane import ane_guard, models, selfcheck
    from rustane.backends import get
    from rustane.backends.ane import AneBackend, AneError
    from rustane.config import preset
    from rustane.mil import ane_rules
    from rustane.runtime.plan import compile_spec

    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path))
    monkeypatch.delenv("FAKEANE_CORRUPT", raising=False)
    cfg = preset(name)
    fam = models.family_for(cfg)
    plan = fam.plan_for(fam.kernel_shape(cfg, "fp16"))
    profiles = {f"{p.chip}-{p.os}": p for p in ane_rules.all_profiles()}
    allowed = {pid: p for pid, p in profiles.items()
               if not [b for b in ane_guard.config_breaches(cfg, p) if b.enforced]}
    assert set(profiles) - set(allowed) == {"m1-26", "m2-26"}
    for pid in ("m1-26", "m2-26"):
        prof = profiles[pid]
        with pytest.raises(ane_guard.AneRuleError, match="matmul-op"):
            ane_guard.require_config(cfg, prof)
        profiled(prof)
        with pytest.raises(AneError) as ei:
            compile_spec(AneBackend(dialect=prof.dialects[0]), plan["sdpaFwd"])
        assert ei.value.stage == "compile"

    sim = get("sim", precision="fp16", check=False, ane_rules=False)
    smallest = min(plan, key=lambda n: math.prod(plan[n].in_shape) + math.prod(plan[n].out_shape))
    for i, (pid, prof) in enumerate(sorted(allowed.items())):
        hook = profiled(prof)
        be = AneBackend(dialect=prof.dialects[0])
        kernels = {n: compile_spec(be, spec) for n, spec in plan.items()}
        try:
            for n, k in kernels.items():
                sizes = [[s.nbytes for s in k.inputs], [s.nbytes for s in k.outputs]]
                assert hook.before_eval(hook.program(selfcheck.render_plan({n: plan[n]})[n][0]), *sizes) == 0, n
            names = list(plan) if i == 0 else [smallest]
            for r in selfcheck.check_kernels({n: plan[n] for n in names}, kernels, sim=sim):
                assert r.ok and r.max_abs_err == 0.0, (pid, r)
        finally:
            for k in kernels.values():
                k.close()
        assert hook.events == [], (pid, hook.events)
        fake_profiles.uninstall()

    if name not in TRAIN_THROUGH_FAKE:
        return
    only = TRAIN_THROUGH_FAKE[name]
    _train_through_fake(profiled, cfg, allowed if only is None else {only: allowed[only]})


@fake_only
@pytest.mark.filterwarnings("ignore:.*ANE compiles in this process:RuntimeWarning")
@pytest.mark.parametrize("name", [n for n in ("tiny", "stories15m", "stories42m", "stories110m", "smollm2-135m",
                                              "qwen3-0.6b") if TRAIN_THROUGH_FAKE.get(n, "") is not None])
def test_every_preset_at_full_width_trains_on_every_allowed_profile(fake, profiled, tmp_path, monkeypatch, name):
    """Every preset, at its full width and truncated to two layers and a 512-token vocabulary, trains
    one step through the fake on every chip profile its rules allow, bit-identical to the fp16
    simulator (loss and every parameter).

    Why the truncation loses no ANE coverage: a kernel's MIL text and blobs are a function of
    ``KernelShape`` (dims, heads, seq_len, RoPE, residual alpha, dtype) alone, so every layer runs the
    same programs with its own weights staged into the same surfaces; depth enters a kernel only
    through the residual alpha when ``residual_scaling`` is on, and the vocabulary never does (the
    embedding and the classifier run on the CPU, the same code for every backend). The test does not
    take that on trust: it renders both plans and requires the truncated preset's programs to be
    exactly the full preset's, text and blobs. Two layers keep the per-layer requests and the
    layer-to-layer hand-over in play. The CPU side at full size (full vocabulary, every layer) is
    trained through the fake at full depth for the presets of TRAIN_THROUGH_FAKE."""
    from rustane import models, selfcheck
    from rustane.config import preset

    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path))
    monkeypatch.delenv("FAKEANE_CORRUPT", raising=False)
    full, cut = preset(name), preset(name, **TRUNCATED)
    fam = models.family_for(full)
    assert models.family_for(cut) is fam
    programs = [selfcheck.render_plan(fam.plan_for(fam.kernel_shape(c, "fp16"))) for c in (full, cut)]
    assert list(programs[0]) == list(programs[1]) and programs[0] == programs[1]
    allowed = _allowed_profiles(cut)
    assert allowed == _allowed_profiles(full) and len(allowed) == 8
    _train_through_fake(profiled, cut, allowed)


def _family_sources(tmp_path):
    """Every family as a user imports it, at the tiny preset's ANE-legal shape (dim 128, seq 192):
    a SmolLM2-style Llama (GQA, tied embeddings) from a GGUF file, and a Qwen3 (q/k-norm,
    head_dim * n_heads = 256 != dim 128) from a transformers folder."""
    import torch
    from model_files import random_hf_llama, write_gguf
    from transformers import Qwen3Config, Qwen3ForCausalLM

    _, tensors = random_hf_llama(tmp_path / "hf", vocab=512, dim=128, hidden=256, heads=4, kv_heads=2, tie=True,
                                 max_position_embeddings=512)
    write_gguf(tmp_path / "llama.gguf", tensors, heads=4, kv_heads=2, context=512)
    torch.manual_seed(0)
    q = Qwen3ForCausalLM(Qwen3Config(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, head_dim=64, rope_theta=1e6,
                                     tie_word_embeddings=True, max_position_embeddings=512)).float()
    with torch.no_grad():  # q/k-norm weights away from 1, so a dropped norm shows
        for prm in q.parameters():
            if prm.ndim == 1:
                prm.add_(0.3 * torch.randn(prm.shape))
    q.save_pretrained(tmp_path / "qwen3")
    return {"llama-gguf": tmp_path / "llama.gguf", "qwen3-hf": tmp_path / "qwen3"}


@fake_only
@pytest.mark.filterwarnings("ignore:.*ANE compiles in this process:RuntimeWarning")
def test_every_imported_family_trains_through_the_fake_bit_identically(fake, tmp_path, monkeypatch):
    """Issue 11's "every family through the fake ANE": each family imported with
    Engine.from_pretrained (the ANE rule guard on, as a user gets it) trains one step through the
    fake framework with the loss and every weight bit-identical to the fp16 simulator, which the
    fake's evaluator is not told about (it runs the MIL text it was handed)."""
    from rustane.engine import Engine

    monkeypatch.setenv("RUSTANE_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("FAKEANE_CORRUPT", raising=False)
    tokens = np.random.default_rng(7).integers(0, 512, 193)
    for fam, src in _family_sources(tmp_path).items():
        want_loss, want = _one_step(Engine.from_pretrained(src, backend="sim", precision="fp16", seq_len=192),
                                    tokens)
        eng = Engine.from_pretrained(src, backend="ane", seq_len=192)
        assert type(eng.model.backend).__name__ == "AneBackend", fam
        loss, got = _one_step(eng, tokens)
        assert np.isfinite(loss) and loss == want_loss, fam
        assert set(got) == set(want), fam
        assert got == want, (fam, sorted(k for k in want if got[k] != want[k]))


@fake_only
def test_compile_budget_warning(fake, backend):
    """Past ANE_COMPILE_WARN_AT compiles per process every compile warns and names the budget.
    (Kept last: from here on this process is over the warning threshold.)"""
    from rustane import _ane

    mil = add_mil((1, 6, 1, 8), (1, 6, 1, 8))
    while _ane.compile_count() < _ane.COMPILE_WARN_AT - 1:
        backend.compile(mil, {}, "budget").close()
    with pytest.warns(RuntimeWarning, match=rf"about {_ane.COMPILE_BUDGET} per process.*0x50004"):
        backend.compile(mil, {}, "budget").close()
    assert _ane.COMPILE_BUDGET == 119


# Keep in this process only the tests that can run in it: outside the fake build and off a Mac
# the contract tests run inside the fake build via test_contract_tier (one line in the report
# instead of a column of skips); on a Mac the fake-only tests have no fake to talk to.
for _name in [n for n in list(globals()) if n.startswith("test_")]:
    if _name in EVERYWHERE:
        continue
    if MODE == "outer" and _name != "test_contract_tier":
        del globals()[_name]
    elif MODE != "outer" and _name == "test_contract_tier":
        del globals()[_name]
    elif MODE == "hardware" and _name in FAKE_ONLY:
        del globals()[_name]
