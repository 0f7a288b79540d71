"""Prints the CUDA toolkit and NCCL roots of the PyPI wheels installed in this Python, as shell
`export` lines for PYSWITCH_CUDA_ROOT / PYSWITCH_NCCL_ROOT, after making the two things the wheels
lack for a CMake build: the `lib64` directory nvcc.profile expects, and unversioned `.so` links
(the wheels ship only `libcublas.so.13` and the like). Idempotent.

Install the wheels first:
    pip install "cuda-toolkit[nvcc,cudart,cublas,cccl]==13.0.3.0" "nvidia-nccl-cu13==2.30.7"
Then: eval "$(python .ci/cuda_toolkit.py)"
"""

import sys
from pathlib import Path

import nvidia

LINKS = {
    "cu13": ["libcudart.so.13", "libcublas.so.13", "libcublasLt.so.13"],
    "nccl": ["libnccl.so.2"],
}


def root_of(name: str) -> Path:
    for base in nvidia.__path__:
        candidate = Path(base) / name
        if (candidate / "lib").is_dir():
            return candidate
    sys.exit(f"cuda_toolkit.py: no nvidia/{name}/lib in this Python; install the wheels first")


def main() -> None:
    roots = {name: root_of(name) for name in LINKS}
    cu13 = roots["cu13"]
    if not (cu13 / "bin" / "nvcc").exists():
        sys.exit("cuda_toolkit.py: nvidia/cu13/bin/nvcc is missing (install cuda-toolkit[nvcc])")
    lib64 = cu13 / "lib64"
    if not lib64.exists():
        lib64.symlink_to("lib")
    for name, libraries in LINKS.items():
        for versioned in libraries:
            target = roots[name] / "lib" / versioned
            plain = target.with_name(versioned.split(".so")[0] + ".so")
            if target.exists() and not plain.exists():
                plain.symlink_to(versioned)
    print(f"export PYSWITCH_CUDA_ROOT={cu13}")
    print(f"export PYSWITCH_NCCL_ROOT={roots['nccl']}")


if __name__ == "__main__":
    main()
