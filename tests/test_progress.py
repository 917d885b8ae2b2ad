"""Training progress: a bar on a terminal, plain lines in a log."""

import re

from vlfuse.tracking import Progress


def test_plain_lines_with_rate_and_eta_when_not_a_terminal(capsys, monkeypatch):
    clock = iter([100.0, 130.0, 160.0])
    monkeypatch.setattr("vlfuse.tracking.time.perf_counter", lambda: next(clock))
    progress = Progress(total=100, initial=40, enabled=True, interactive=False)  # a resumed run at 40
    progress.update(10)
    progress.report(50, 1.23456, 1e-3, 85.24)  # 30 s for 10 steps: 50 steps left take 150 s
    progress.report(60, 1.0, 5e-4, 90.0)  # 60 s for 20 steps: 40 left, 120 s
    progress.close()
    out, err = capsys.readouterr()
    assert out.splitlines() == [
        "train step 50/100 (50%): loss 1.2346, lr 1.00e-03, 85.2 samples/s, elapsed 0:30, ETA 2:30",
        "train step 60/100 (60%): loss 1.0000, lr 5.00e-04, 90.0 samples/s, elapsed 1:00, ETA 2:00",
    ]
    assert err == ""


def test_a_bar_on_a_terminal_and_silence_off_the_main_process(capsys):
    bar = Progress(total=10, initial=0, enabled=True, interactive=True)
    bar.update(5)
    bar.report(5, 2.0, 1e-3, 50.0)
    bar.close()
    out, err = capsys.readouterr()
    assert out == "" and re.search(r"train:\s+50%.*loss=2\.0000", err)
    quiet = Progress(total=10, initial=0, enabled=False, interactive=False)
    quiet.update(5)
    quiet.report(5, 2.0, 1e-3, 50.0)
    assert capsys.readouterr() == ("", "")
