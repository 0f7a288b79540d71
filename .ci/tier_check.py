"""CI: prove which CPU tier a capped run is on, before its tests run.

Reads the caps from the environment (PYSWITCH_CPU_ISA, ONEDNN_MAX_CPU_ISA), checks that
pyswitch's active kernels are the capped ones, and runs one oneDNN product under ONEDNN_VERBOSE
in a child process to show the ISA oneDNN reports. Then it runs a bfloat16 layer forward and
backward, which needs no native bf16 support on any tier. Exits non-zero on any mismatch.
"""

import os
import subprocess
import sys

import numpy as np

import pyswitch

# How oneDNN's verbose "isa:" line must read under each ONEDNN_MAX_CPU_ISA value used in CI:
# words it must contain, and words that would mean the cap did not hold.
ONEDNN_ISA_WORDS = {
    "AVX2": (["AVX2"], ["512", "AMX"]),
    "AVX512_CORE": (["AVX-512"], ["bfloat16", "AMX", "VNNI", "DL Boost"]),
}

wanted_ours = os.environ.get("PYSWITCH_CPU_ISA")
wanted_onednn = os.environ.get("ONEDNN_MAX_CPU_ISA")
info = pyswitch.build_info()
print(f"pyswitch active ISA: {info['active_isa']} (cap {wanted_ours})")
print(f"GEMM float32 : {info['gemm']['float32']}")
print(f"GEMM bfloat16: {info['gemm']['bfloat16']}")
if wanted_ours and info["active_isa"] != wanted_ours:
    sys.exit(f"tier_check: PYSWITCH_CPU_ISA={wanted_ours}, active ISA {info['active_isa']}")

child = subprocess.run(
    [
        sys.executable,
        "-c",
        "import numpy as np, pyswitch; a = np.ones((4, 8), np.float32); "
        "pyswitch.matmul(a, a.T.copy(), library='onednn')",
    ],
    env={**os.environ, "ONEDNN_VERBOSE": "1"},
    capture_output=True,
    text=True,
    check=True,
)
isa_lines = [line for line in child.stdout.splitlines() if ",isa:" in line]
print("oneDNN says:", *isa_lines)
if wanted_onednn:
    needed, forbidden = ONEDNN_ISA_WORDS[wanted_onednn]
    line = isa_lines[0] if isa_lines else ""
    if not all(w in line for w in needed) or any(w in line for w in forbidden):
        sys.exit(f"tier_check: ONEDNN_MAX_CPU_ISA={wanted_onednn} but oneDNN reports {isa_lines}")

layer = pyswitch.SwitchFFN(32, 64, 4, dtype="bfloat16", seed=1)
x = np.random.default_rng(0).standard_normal((64, 32)).astype(pyswitch.bfloat16)
y = layer.forward(x, training=True)
dx = layer.backward(np.ones_like(y))
assert y.dtype == pyswitch.bfloat16 and np.isfinite(dx.astype(np.float32)).all()
print("bfloat16 SwitchFFN forward/backward: ok")
