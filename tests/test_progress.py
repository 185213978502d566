"""ttp_ray.progress (plain lines off a terminal, throttled; a rich bar on one; nothing when disabled), the CLI's
--quiet, and ttp_ray.interrupts' trap. No timing assumptions: throttling is shown with an interval of 0 (every
change printed) and of an hour (only the start and end lines)."""
import io
import os
import signal
import time

import pytest

from conftest import run_cli
from ttp_ray.interrupts import Interrupted, stop_on_signals
from ttp_ray.progress import NULL_PROGRESS, Progress, Task, current, format_seconds, resolve, using


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_start_end_and_throttled_status():
    out = io.StringIO()
    p = Progress(stream=out, interval_s=3600.0)
    with p.task("kernel of digits", total=10, unit="samples") as t:
        for _ in range(10):
            t.advance()
    lines = out.getvalue().splitlines()
    assert lines[0] == "kernel of digits: started (10 samples)"
    assert len(lines) == 2 and lines[1].startswith("kernel of digits: done, 10 samples in ")

    out = io.StringIO()
    p = Progress(stream=out, interval_s=0.0)
    with p.task("steps", total=4, unit="steps") as t:
        for _ in range(4):
            t.advance()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 + 3 + 1  # start, 1/4 .. 3/4, end (4/4 is said by the end line)
    assert lines[2].startswith("steps: 2/4 steps (50%), ") and ", ETA " in lines[2]


def test_eta_is_the_mean_rate_of_the_units_done_here():
    t = Task(None, "x", total=100, unit="", completed=40)  # 40 done before (a resumed sweep)
    assert t.eta_s is None  # nothing done here yet: no rate
    t.completed = 50.0
    t.started -= 10.0  # 10 units in 10 s
    assert t.eta_s == pytest.approx(50.0, rel=0.05)
    p = Progress(stream=io.StringIO(), interval_s=3600.0)
    t = p.task("sweep", total=10)  # a 100 s set-up phase, then 1 unit, then 2 more in 10 s
    t.started -= 100.0
    t.advance()
    t._first = (t._first[0] - 10.0, t._first[1])
    t.advance(2)
    assert t.eta_s == pytest.approx(7 * 10.0 / 2, rel=0.05)  # the rate after the first unit, not 3 per 110 s
    t.close()
    assert format_seconds(None) == "?" and format_seconds(2.54) == "2.5 s" and format_seconds(125) == "2 min 05 s"
    assert format_seconds(3720) == "1 h 02 min"


def test_disabled_prints_nothing_and_a_tty_gets_a_rich_bar():
    out = io.StringIO()
    p = Progress(enabled=False, stream=out)
    with p.task("x", total=3) as t:
        t.advance()
    p.note("hello")
    assert out.getvalue() == "" and NULL_PROGRESS.enabled is False
    tty = FakeTTY()
    p = Progress(stream=tty, live=True)
    with p.task("kernel", total=3, unit="samples") as t:
        t.advance(3)
    with p.task("open-ended phase"):
        p.note("a note above the bars")
    text = tty.getvalue()
    assert "kernel" in text and "3/3" in text and "ETA" in text and "a note above the bars" in text
    assert "started" not in text  # no plain lines on a terminal


def test_ambient_progress_is_null_unless_set():
    assert current() is NULL_PROGRESS and resolve(None) is NULL_PROGRESS
    p = Progress(stream=io.StringIO())
    with using(p):
        assert current() is p and resolve(None) is p
        mine = Progress(enabled=False)
        assert resolve(mine) is mine
    assert current() is NULL_PROGRESS
    with using(Progress(enabled=False)):  # one like NULL_PROGRESS: leaving removes it, not NULL_PROGRESS
        pass
    assert current() is NULL_PROGRESS


@pytest.mark.timeout(240)
def test_predict_progress_on_stderr_and_quiet(capsys):
    args = ["predict", "--dataset", "digits-5to9:subset=60", "--lr-fraction", "0.5", "--steps", "30", "--batch-size",
            "20", "--k", "64", "--no-cache"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    for what in ("kernel of digits-5to9", "simulating 1 config(s)", "measuring the step time"):
        assert f"{what}" in err and "started" in err and "done" in err, err
    code, quiet_out, quiet_err = run_cli(args + ["--quiet"], capsys)
    assert code == 0 and quiet_err == "", quiet_err
    strip = [line for line in out.splitlines() if "step time" not in line and "kernel" not in line]
    assert strip == [line for line in quiet_out.splitlines() if "step time" not in line and "kernel" not in line]


@pytest.mark.timeout(240)
def test_finetune_progress_counts_steps(capsys):
    code, out, err = run_cli(["finetune", "--dataset", "digits-5to9:subset=60", "--lr", "0.01", "--steps", "12",
                              "--batch-size", "20"], capsys)
    assert code == 0, err
    assert "fine-tuning (lr 0.01, m 0, B 20, ce): started (12 steps)" in err
    assert "fine-tuning (lr 0.01, m 0, B 20, ce): done, 12 steps in" in err


@pytest.mark.timeout(30)
def test_trap_raises_interrupted_and_defers_inside_blocking_calls():
    # the handler runs once the signal reaches this thread (another thread may take it first, and a loaded machine
    # may schedule that one late): wait for the event, not for a fixed amount of work
    with pytest.raises(Interrupted) as caught:
        with stop_on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            while True:
                time.sleep(0.001)
    assert caught.value.exit_code == 143 and caught.value.signum == signal.SIGTERM
    with stop_on_signals() as trap:
        with pytest.raises(Interrupted) as caught:
            with trap.deferred():
                os.kill(os.getpid(), signal.SIGINT)
                while trap.fired is None:
                    time.sleep(0.001)
                assert trap.fired == signal.SIGINT  # recorded, not raised, inside the block
        assert caught.value.exit_code == 130
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored
