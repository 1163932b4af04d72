"""Cross-build a C test driver for arm64 and run it under qemu-aarch64 (the NEON and arm64 tiers)."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tiers import require_tools

ROOT = Path(__file__).resolve().parents[1]
HINT = "apt-get install gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user"


def build_driver(out_dir: Path, driver: str, sources: list[str], flags: list[str]):
    """Compile ``tests/neon/<driver>.c`` with ``csrc/<sources>`` (static, -Werror) and return
    ``run(*args, data=b"") -> stdout bytes``, which fails the test on a non-zero exit."""
    require_tools("aarch64-linux-gnu-gcc", "qemu-aarch64", hint=HINT)
    exe = out_dir / driver
    csrc = ROOT / "csrc"
    cmd = ["aarch64-linux-gnu-gcc", "-std=c11", *flags, "-Wall", "-Wextra", "-Werror", "-static", f"-I{csrc}",
           str(ROOT / "tests" / "neon" / f"{driver}.c"), *(str(csrc / s) for s in sources), "-o", str(exe), "-lm"]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr

    def run(*args, data: bytes = b"") -> bytes:
        # binfmt_misc is not mounted in every sandbox/CI: always go through qemu explicitly
        p = subprocess.run(["qemu-aarch64", str(exe), *map(str, args)], input=data, capture_output=True,
                           timeout=300)
        assert p.returncode == 0, p.stderr.decode()
        return p.stdout

    return run
