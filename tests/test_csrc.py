"""The C source of the CPU kernels (csrc/mgs_nested_cpu.c): the copy the checkpoints ship equals it,
every variant compiles with warnings as errors on any x86-64 machine (the flags are explicit, so no
block is skipped where the CPU lacks it), and the kernel tests pass under AddressSanitizer."""

import os
import shutil
import subprocess
import sys

import pytest

from treeffn_hf.modeling import mgs_kernels_cpu

from .conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "csrc"))
import embed  # noqa: E402

COMPILER = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
AVX512 = ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vnni"]
VARIANTS = {
    "avx512": AVX512,
    "amx": AVX512 + ["-mavx512bf16", "-mamx-tile", "-mamx-int8", "-mamx-bf16"],
    "counting": AVX512 + ["-DTREEFFN_COUNT_BYTES"],
}


def test_the_bundled_source_is_the_c_file():
    assert mgs_kernels_cpu.SOURCE == embed.C_SOURCE.read_text()
    assert embed.EMBEDDED.read_text() == embed.embedded_text(embed.C_SOURCE.read_text()), "run python csrc/embed.py"


@pytest.mark.skipif(COMPILER is None, reason="no C compiler")
@pytest.mark.parametrize("variant", VARIANTS)
def test_every_variant_compiles_without_warnings(variant, tmp_path):
    result = subprocess.run([COMPILER, "-O2", "-Wall", "-Wextra", "-Werror", "-fopenmp", "-shared", "-fPIC",
                             *VARIANTS[variant], str(embed.C_SOURCE), "-o", str(tmp_path / "k.so"), "-lm"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]


def test_without_avx512_the_source_refuses_to_compile(tmp_path):
    if COMPILER is None:
        pytest.skip("no C compiler")
    result = subprocess.run([COMPILER, "-O2", "-mno-avx512f", "-fopenmp", "-shared", "-fPIC", str(embed.C_SOURCE),
                             "-o", str(tmp_path / "k.so")], capture_output=True, text=True)
    assert result.returncode != 0 and "needs AVX-512" in result.stderr


@pytest.mark.skipif(mgs_kernels_cpu.library_error() is not None,
                    reason=f"CPU kernel unavailable: {mgs_kernels_cpu.library_error()}")
def test_the_kernel_tests_pass_under_address_sanitizer(tmp_path):
    runtime = [subprocess.run([COMPILER, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
               for name in ("libasan.so", "libstdc++.so")]
    if not all(os.path.isabs(path) for path in runtime):
        pytest.skip("the compiler has no AddressSanitizer runtime")
    # libstdc++ preloaded too: torch throws C++ exceptions, which ASan must intercept from the start
    env = {**os.environ, "LD_PRELOAD": " ".join(runtime), "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
           "TREEFFN_KERNEL_CFLAGS": "-fsanitize=address -fno-omit-frame-pointer",
           "TREEFFN_KERNEL_CACHE": str(tmp_path / "kernels")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                             str(REPO_ROOT / "tests" / "test_kernels_cpu.py"), "-k", "naive_twin or bytes"],
                            capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "passed" in result.stdout
    built = [path for path in (tmp_path / "kernels").iterdir() if path.name.endswith(".so")]
    symbols = subprocess.run(["nm", "-D", str(built[0])], capture_output=True, text=True).stdout
    assert "__asan_report" in symbols  # the library the tests ran is the instrumented one
