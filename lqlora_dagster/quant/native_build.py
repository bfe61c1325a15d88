"""Build and load this package's small C++ extensions (`kernels/`).

Each is compiled once per machine by the local compiler and cached by torch. Without a
compiler (or with its switch set to 0) callers get None and use the pure-torch path,
which computes the same values.
"""

import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

KERNELS = Path(__file__).with_name("kernels")
# no fused multiply-adds beyond those the sources ask for: the results must match torch's
FLAGS = ["-O3", "-march=native", "-ffp-contract=off"]


def load_extension(name: str, source: str, switch: str, openmp: bool = False) -> ModuleType | None:
    """The compiled `kernels/<source>` as module `name`, or None when the environment
    variable `switch` is 0 or it cannot be built here (said once in the log)."""
    if os.environ.get(switch, "1") == "0":
        return None
    venv_bin = str(Path(sys.executable).parent)  # pip's ninja, when the venv is not activated
    path = os.environ.get("PATH", "")
    try:
        # the C++ build tools load only when a kernel is compiled
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:
            os.environ["PATH"] = os.pathsep.join([venv_bin, path])
        log.info("loading the %s kernel (built once per machine, about a minute)", name)
        omp = ["-fopenmp"] if openmp else []
        return load(name=name, sources=[str(KERNELS / source)], extra_cflags=FLAGS + omp,
                    extra_ldflags=omp, verbose=False)
    except Exception as err:  # no compiler, no headers, an unsupported platform
        log.warning("%s unavailable, using pure torch: %s", name, str(err).splitlines()[0][:200])
        return None
    finally:
        os.environ["PATH"] = path
