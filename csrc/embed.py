"""Write treeffn_hf/modeling/mgs_kernels_cpu_source.py from csrc/mgs_nested_cpu.c.

A checkpoint's remote code is a flat folder of Python files, so the kernel's C source travels in
it as a string; this file stays the source of truth. Run after editing the C file:

    python csrc/embed.py

tests/test_csrc.py fails while the two disagree.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
C_SOURCE = ROOT / "csrc" / "mgs_nested_cpu.c"
EMBEDDED = ROOT / "treeffn_hf" / "modeling" / "mgs_kernels_cpu_source.py"


def embedded_text(source: str) -> str:
    if '"""' in source or source.endswith("\\"):
        raise ValueError("the C source cannot be embedded in a raw triple-quoted string as it is")
    return ('"""The C source of the nested MGS CPU kernels, embedded for the remote-code bundle.\n\n'
            "Generated from csrc/mgs_nested_cpu.c by `python csrc/embed.py`: edit the C file, not this one.\n"
            '"""\n\nSOURCE = r"""' + source + '"""\n')


def main() -> None:
    EMBEDDED.write_text(embedded_text(C_SOURCE.read_text()))
    print(f"wrote {EMBEDDED.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
