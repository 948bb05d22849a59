"""Importing vpl_trl leaves the process as it was: bitsandbytes unimported (or the caller's), stdout, the
environment."""

import os
import subprocess
import sys

import pytest

CHECK = """
import os, sys
if sys.argv[1] == "bitsandbytes first":
    import bitsandbytes
environment, stdout = dict(os.environ), sys.stdout
before = sys.modules.get("bitsandbytes")
import vpl_trl
assert sys.modules.get("bitsandbytes") is before, "the bitsandbytes entry of sys.modules changed"
assert sys.stdout is stdout, "sys.stdout was replaced"
changed = {k for k in set(environment) | set(os.environ) if environment.get(k) != os.environ.get(k)}
assert not changed, f"the environment changed: {sorted(changed)}"
"""


@pytest.mark.parametrize("case", ["plain", "bitsandbytes first"])
def test_import_leaves_modules_stdout_and_environment_as_they_were(case):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR")}
    env["WANDB_MODE"] = "offline"  # transformers then prints a notice on import: not to stdout
    run = subprocess.run([sys.executable, "-c", CHECK, case], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout == ""
