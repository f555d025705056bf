"""README's three quick starts, as a user runs them, against whatever mlellp_ext
this Python imports (tests/install_check.sh: the installed wheel). Trainings
run for fewer epochs than README says: this checks that they run, not how well
they learn (test_docs.py and test_examples.py do, in the full suite).

    python tests/quick_starts.py [--epochs 1]
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from test_docs import _runnable  # noqa: E402  (README's blocks, as test_docs.py reads them)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args(argv)
    env = dict(os.environ, PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""),
               MPLBACKEND="Agg")
    blocks = _runnable("README.md")
    python = [code for lang, code, _, marker in blocks if lang == "python" and not marker]
    from_files = [marker[len("<!-- from "):-len(" -->")].strip() for _, _, _, marker in blocks
                  if marker and marker.startswith("<!-- from ")]
    bash = [code for lang, code, _, marker in blocks if lang == "bash" and not marker]
    assert python and from_files == ["examples/own_training_loop.py"] and bash, "README's quick starts changed"
    with tempfile.TemporaryDirectory() as scratch:
        print(f"quick start 1: {len(python)} Python blocks", flush=True)
        subprocess.run([sys.executable, "-c", "ns = {}\n" + "".join(f"exec({c!r}, ns)\n" for c in python)],
                       cwd=scratch, env=env, check=True)
        print(f"quick start 2: {from_files[0]} --epochs {args.epochs}", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, from_files[0]), "--epochs", str(args.epochs)],
                       cwd=scratch, env=env, check=True)
        for code in bash:
            code = re.sub(r"--epochs \d+", f"--epochs {args.epochs}", code)
            print(f"quick start 3:\n{code}", flush=True)
            subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=scratch, env=env, check=True)


if __name__ == "__main__":
    main()
