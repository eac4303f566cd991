"Shared fixtures: one tiny CREAM run, made once per test session through the `cream` command."
import subprocess, sys
from pathlib import Path
import pytest

CREAM = [str(Path(sys.executable).parent/'cream')]   # the console script the package installs


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory):
    "(run_dir, stdout) of an uninterrupted 2-iteration CREAM run of the `tiny` preset."
    d = tmp_path_factory.mktemp('runs')/'full'
    r = subprocess.run(CREAM + ['run', '--preset', 'tiny', '--run-dir', str(d), '--quiet'], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return d, r.stdout
