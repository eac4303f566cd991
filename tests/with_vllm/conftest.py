"""The vLLM engine's tests. They need vLLM, which lives in its own environment (.venv-vllm, `make vllm-env`):
`make test` runs them with that environment's python before the main pytest, which leaves this folder out
(`--ignore=tests/with_vllm`). Run them alone with `.venv-vllm/bin/python -m pytest tests/with_vllm`."""
import importlib.util, os
import pytest

# vLLM's engine core runs in the test process (no spawned workers); one thread as everywhere in the tests
os.environ.setdefault('VLLM_ENABLE_V1_MULTIPROCESSING', '0')

def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec('vllm') is None:
        raise pytest.UsageError("tests/with_vllm need vLLM: run them with .venv-vllm/bin/python -m pytest tests/with_vllm "
                                "(make vllm-env builds that environment); the main suite runs with --ignore=tests/with_vllm")
