"One writer per run directory: a live holder refuses a second writer in another process; a SIGKILLed one is taken over."
import json, logging, os, signal, subprocess, sys, time
from pathlib import Path
import pytest
from cream_nb.core.artifacts import RunLock, RunLocked

HOLD = "import sys, time; from cream_nb.core.artifacts import RunLock; l = RunLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(60)"

def _holder(run_dir):
    p = subprocess.Popen([sys.executable, '-c', HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True, start_new_session=True)
    assert p.stdout.readline().strip() == 'held'
    return p

def test_second_writer_refused_then_dead_holder_taken_over(tmp_path, caplog):
    p = _holder(tmp_path)
    try:
        with pytest.raises(RunLocked, match=f"is being written by pid {p.pid} on "):
            RunLock(tmp_path).acquire()
        assert json.loads((tmp_path/'.lock.json').read_text())['pid'] == p.pid
    finally:
        os.killpg(p.pid, signal.SIGKILL); p.wait()
    assert json.loads((tmp_path/'.lock.json').read_text())['pid'] == p.pid   # a SIGKILL leaves the holder file behind
    with caplog.at_level(logging.WARNING, logger='cream_nb'):
        with RunLock(tmp_path) as l:
            assert l.holder()['pid'] == os.getpid()
    assert f"taking over the lock of pid {p.pid}" in caplog.text
    assert sorted(os.listdir(tmp_path)) == ['.lock']
