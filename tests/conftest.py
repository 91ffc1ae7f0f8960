"""One torch thread, in the test process and in every script a test starts (they inherit OMP_NUM_THREADS): the
models here are tiny, so a second thread buys nothing, and on a two-core machine that other work shares, every
parallel region waits for a descheduled thread (runs ten times slower were measured)."""
import os
import runpy
import signal
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported, here or in a subprocess

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture
def in_process(monkeypatch, capfd):
    """A script's command line (train.py, eval.py) run in this process as `python script args` runs it, its
    __main__ block included, without an interpreter's start-up (seconds each, for a case refused in
    milliseconds): returns (exit code, stdout, stderr)."""
    def call(script, *args):
        handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        monkeypatch.setattr(sys, "argv", [str(script), *map(str, args)])
        capfd.readouterr()
        try:
            runpy.run_path(str(script), run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        out, err = capfd.readouterr()
        return code, out, err
    return call
