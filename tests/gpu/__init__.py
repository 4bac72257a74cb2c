"""The GPU suite (see conftest.py). A package, so that its conftest is `gpu.conftest` and never takes the place of
tests/conftest.py, which the CPU tests import as `conftest`."""
