"""Progress without a terminal: plain lines on stderr at a sensible rate (none in a run's first seconds; then every
tenth of the work or every minute), with the elapsed time and an estimate of what is left."""

from regmean import progress


def test_plain_lines_at_a_sensible_rate(monkeypatch, capsys):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    with progress.progress("merging", "steps", total=100, done=20) as advance:  # (pytest's stdout: no terminal)
        for _ in range(80):
            clock[0] += 1.0  # one second a step
            advance(1)
    lines = capsys.readouterr().err.splitlines()
    # quiet for 10 s; then a line each 10 steps (the first once 10 more are done), and the last step's
    assert lines[0] == "merging: 30/100 steps, 0:00:10 elapsed, about 0:01:10 left"
    assert lines[1] == "merging: 40/100 steps, 0:00:20 elapsed, about 0:01:00 left"
    assert lines[-1] == "merging: 100/100 steps, 0:01:20 elapsed"
    assert len(lines) == 8


def test_short_work_says_nothing_and_disabled_says_nothing(monkeypatch, capsys):
    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    for enabled in (True, False):
        with progress.progress("measuring", "examples", total=5, enabled=enabled) as advance:
            for _ in range(5):
                clock[0] += 0.5
                advance(1)
    assert capsys.readouterr().err == ""
