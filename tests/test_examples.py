"""The examples run as a user runs them, and do what they say."""
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_own_training_loop_learns():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "own_training_loop.py")],
                         capture_output=True, text=True, timeout=900, check=True).stdout
    acc = {m.group(1): float(m.group(2)) for m in re.finditer(r"^(\w+) test accuracy: ([0-9.]+)$", out, re.M)}
    assert set(acc) == {"EM", "DLLP"}, out
    # A classifier that learnt nothing scores about 0.5 (digits >= 5 are half of them).
    assert acc["EM"] >= 0.9 and acc["DLLP"] >= 0.9, out
