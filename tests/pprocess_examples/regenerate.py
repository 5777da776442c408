"""Write the expected outputs: each example run with the original pprocess 0.5.1 (ported to Python 3).

``python tests/pprocess_examples/regenerate.py [NAME...]`` downloads pprocess
0.5.1 with pip and ports its programs and its module (port.py), runs every
example (or those whose id contains a NAME) with the original pprocess on this
machine, and writes ``expected/<id>.json``. With ``--compare`` it also runs
each with zpar.pprocess and says which differ; with ``--check`` it writes
nothing and says which differ from the stored expected outputs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import harness
import port


def main(argv: list[str]) -> int:
    compare, check = "--compare" in argv, "--check" in argv
    names = [a for a in argv if not a.startswith("--")]
    chosen = [e for e in harness.EXAMPLES if not names or any(n in harness.example_id(e) for n in names)]
    differ = 0
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        release = port.ported(base / "release")
        for example in chosen:
            ran = harness.run(example, "original", harness.fresh_workdir(base, example, "original"), release,
                              release / "original")
            line = f"{harness.example_id(example)}: exit {ran.returncode}"
            if check:
                stored = harness.load_expected(example)
                same = (stored["returncode"], stored["output"]) == (ran.returncode, ran.output)
                differ += not same
                line += ", as stored" if same else ", DIFFERS from the stored output"
            else:
                harness.save_expected(example, ran)
            if compare:
                ours = harness.run(example, "zpar", harness.fresh_workdir(base, example, "zpar"), release)
                same = (ours.returncode, ours.output) == (ran.returncode, ran.output)
                differ += not same
                line += ", zpar.pprocess " + ("prints the same" if same else f"DIFFERS (exit {ours.returncode})")
            print(line, flush=True)
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
