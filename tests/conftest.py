"""Test setup: 8 fake CPU devices and a shared compilation cache, set before JAX starts."""

import os
import tempfile

# Trainer tests compile the same tiny programs in several processes: share the compilations.
# JAX reads these when it is imported, so they come before `import chex` (which imports JAX).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "cxr_jax_tests_xla_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import chex  # pylint: disable=g-import-not-at-top

# Before any test touches a device (backends start once per process); the flag goes into
# XLA_FLAGS, so the CLIs the tests start as subprocesses get the same 8 devices.
chex.set_n_cpu_devices(8)
