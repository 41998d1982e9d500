"""C++ kernels for fast CPU decoding, compiled on first use and cached.

    from llmos import kernels
    ext = kernels.load()          # the compiled module, or None (reason in kernels.why_not())

The source (decode.cpp) is built with torch.utils.cpp_extension.load into
$LLMOS_HOME/kernels/<name> (default ~/.llmos/kernels), where <name> hashes the source,
the compiler flags, torch's version and this CPU's instruction sets, so a home directory
shared between different machines never loads a build for the wrong CPU. The first build
takes 30-60 s of CPU (torch's headers); later loads are instant. Without a compiler load() returns
None with a one-line message on stderr (LLMOS_KERNELS=0: None, silently), and llmos.fast
falls back to plain PyTorch.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import sys
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode.cpp")
_cache: dict[str, object] = {}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's instruction-set flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def build_flags(scalar: bool = False) -> list[str]:
    """-march=native where the CPU has AVX2+FMA+F16C (the kernels' fast path), else portable code."""
    flags = ["-O3", "-fopenmp", "-std=c++17"]
    if scalar:
        return flags + ["-DLLMOS_SCALAR"]
    have = cpu_flags()
    if {"avx2", "fma", "f16c"} <= have:
        flags.append("-march=native")
    return flags


def why_not() -> str | None:
    return _cache.get("error")


def load(verbose: bool = False):
    """The compiled extension (cached per process and on disk), or None when it cannot be built.
    LLMOS_KERNELS=scalar builds the portable code without SIMD (what CPUs without AVX2 run), so
    `LLMOS_KERNELS=scalar pytest tests/test_fast.py` tests it on any machine."""
    mode = os.environ.get("LLMOS_KERNELS", "1")
    scalar = mode == "scalar"
    key = "scalar" if scalar else "native"
    if key in _cache:
        return _cache[key]
    ext = None
    if mode == "0":
        _cache["error"] = "disabled by LLMOS_KERNELS=0"
    else:
        try:
            ext = _build(scalar, verbose)
        except Exception as e:  # no compiler, missing headers, a failed build: all mean "use PyTorch"
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            _cache["error"] = first[:200]
    if ext is None and mode != "0":
        print(f"llmos: fast CPU kernels unavailable ({_cache['error']}); using the slower PyTorch path "
              "(install g++ to enable them)", file=sys.stderr)
    _cache[key] = ext
    return ext


def _build(scalar: bool, verbose: bool):
    from torch.utils import cpp_extension  # deferred: it imports setuptools, and only a build needs it

    flags = build_flags(scalar)
    have = sorted(f for f in cpu_flags() if f.startswith(("avx", "fma", "f16c", "amx")))
    tag = hashlib.sha256("\n".join([SOURCE.read_text(), " ".join(flags), torch.__version__, *have]).encode())
    name = f"llmos_kernels_{tag.hexdigest()[:12]}"
    home = Path(os.environ.get("LLMOS_HOME", Path.home() / ".llmos")).expanduser()
    build_dir = home / "kernels" / name
    built = build_dir.is_dir() and any(build_dir.glob("*.so"))
    cxx = os.environ.get("CXX", "c++")  # what cpp_extension compiles with
    if not built and shutil.which(cxx) is None:  # before announcing a build that cannot happen
        raise RuntimeError(f"no C++ compiler: {cxx} not found")
    build_dir.mkdir(parents=True, exist_ok=True)
    if not verbose and not built:
        print(f"llmos: compiling CPU kernels into {build_dir} (once, under a minute)", file=sys.stderr)
    # torch builds with ninja; the PyPI `ninja` package puts it beside this Python, maybe not on PATH.
    env_bin = str(Path(sys.executable).parent)
    if env_bin not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([env_bin, os.environ.get("PATH", "")])
    return cpp_extension.load(name=name, sources=[str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                              build_directory=str(build_dir), verbose=verbose)
