"""`--nproc N`: the same command run again as N processes under torchrun, and reported as one process reports.

Before any process starts, the launcher checks what it can (REGMEAN_DIST_TIMEOUT, the data file, the recipe and its
statistics). It then starts torchrun's agent (`python -m regmean.launch`, which runs torch.distributed.run and writes
each failed rank's exit code to a file instead of printing a traceback) in a session of its own, with the ranks'
stderr redirected to files that it follows: their progress passes through, their `error:` lines are kept. At the end
it prints one line per distinct error, naming the ranks, and exits as one process would (2 for the user's mistakes,
3 for internal errors; 128+N for a rank killed by signal N). SIGTERM and SIGINT are passed to the agent as SIGTERM,
and it stops the ranks (SIGTERM, SIGKILL after 30 s); the launcher waits for that before it says what was written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import NoReturn

from regmean.errors import one_line

FORWARDED = (signal.SIGTERM, signal.SIGINT)
STOPPED = {-signal.SIGTERM, -signal.SIGINT, 128 + signal.SIGTERM, 128 + signal.SIGINT}
"""Exit codes of a rank that was stopped (by the agent, after another rank failed, or by the user)."""
POLL_SECONDS = 0.1


def relaunch_with_torchrun(nproc: int, data: Path | None = None, check: Callable[[], None] | None = None) -> NoReturn:
    """Run this same command as `torchrun --standalone --nproc_per_node N -m regmean ...` and exit as it ended;
    `check` refuses, before any process starts, what every rank would refuse alike (a merge's recipe)."""
    import typer

    preflight(data, check)
    args = without_nproc(sys.argv[1:])
    with tempfile.TemporaryDirectory(prefix="regmean-nproc-") as folder:
        logs = Path(folder)
        ranks = RankLogs(logs / "ranks")
        code, signalled = _run_agent(nproc, args, logs, ranks)
        ranks.follow()
        failures = _failures(logs / "failures.json")
        if os.environ.get("REGMEAN_DEBUG"):
            sys.stderr.write((logs / "agent.log").read_text(errors="replace"))
        lines, code = report(code, signalled, failures, ranks, _last_line(logs / "agent.log"))
    for line in lines:
        print(f"error: {one_line(line)}", file=sys.stderr)
    raise typer.Exit(code)


def preflight(data: Path | None, check: Callable[[], None] | None) -> None:
    """The mistakes every rank would make alike, refused before any process starts."""
    from regmean import distributed

    distributed.timeout()
    if data is not None:
        from regmean.io.data import read_table

        read_table(data)
    if check is not None:
        check()


def without_nproc(args: list[str]) -> list[str]:
    """The command line without its --nproc N / --nproc=N."""
    args = list(args)
    for i, a in enumerate(args):
        if a == "--nproc":
            del args[i : i + 2]
            break
        if a.startswith("--nproc="):
            del args[i]
            break
    return args


@dataclass
class RankLogs:
    """The ranks' stderr files (torchrun's --log-dir --redirects 2), followed: lines pass through to this stderr as
    they come, except `error:` lines, which are kept by rank."""

    folder: Path
    errors: dict[int, list[str]] = field(default_factory=dict)
    muted: bool = False
    """Set once the run is being stopped: what the ranks say while they stop is not passed on."""
    wrote: bool = False
    """Rank 0 said "wrote ...": its output was revealed."""
    kept: bool = False
    """Rank 0 said it kept the finished steps of an interrupted merge for a rerun."""
    _read: dict[Path, int] = field(default_factory=dict)
    _partial: dict[Path, bytes] = field(default_factory=dict)

    def follow(self) -> None:
        for path in sorted(self.folder.glob("*/attempt_*/*/stderr.log")):
            if path.parent.name.isdigit():
                self._follow(path, int(path.parent.name))

    def _follow(self, path: Path, rank: int) -> None:
        with open(path, "rb") as f:
            f.seek(self._read.get(path, 0))
            chunk = f.read()
        self._read[path] = self._read.get(path, 0) + len(chunk)
        *lines, self._partial[path] = (self._partial.get(path, b"") + chunk).split(b"\n")
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            if line.startswith("error: "):
                self.errors.setdefault(rank, []).append(line.removeprefix("error: "))
                continue
            self.wrote |= rank == 0 and line.startswith("wrote ")
            self.kept |= rank == 0 and line.startswith("interrupted: the ")
            if not self.muted:
                sys.stderr.write(line + "\n")
        sys.stderr.flush()


def _run_agent(nproc: int, args: list[str], logs: Path, ranks: RankLogs) -> tuple[int, int | None]:
    """Run torchrun's agent until it ends, following the ranks' logs; returns its exit code and the signal that
    was forwarded to it (None if none)."""
    cmd = [sys.executable, "-m", "regmean.launch", str(os.getpid()), str(logs / "failures.json")]
    cmd += ["--standalone", f"--nproc_per_node={nproc}", f"--log-dir={ranks.folder}", "--redirects=2"]
    cmd += ["-m", "regmean", *args]
    received: list[int] = []
    agent: subprocess.Popen | None = None

    def forward(signum: int, frame: object) -> None:
        if not received and agent is not None:  # later signals are ignored: the agent is stopping the ranks
            agent.send_signal(signal.SIGTERM)  # (the ranks stop on SIGTERM even while they start)
        received.append(signum)
        ranks.muted = True

    previous = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        with open(logs / "agent.log", "wb") as log:
            agent = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stderr=log, start_new_session=True, env=_environment()
            )
            if received:  # a signal came while the agent was starting
                agent.send_signal(signal.SIGTERM)
            while agent.poll() is None:
                ranks.follow()
                time.sleep(POLL_SECONDS)
    finally:
        if agent is not None and agent.poll() is None:  # this launcher failed: its ranks are stopped too
            agent.send_signal(signal.SIGTERM)
            agent.wait()
        for s, handler in previous.items():
            signal.signal(s, handler)
    return agent.returncode, (received[0] if received else None)


def _environment() -> dict[str, str]:
    """The ranks write to files: they wrap their lines to this terminal's width, as they would if they wrote to it."""
    env = dict(os.environ)
    if sys.stderr.isatty() and "COLUMNS" not in env:
        env["COLUMNS"] = str(os.get_terminal_size(sys.stderr.fileno()).columns)
    return env


def _failures(path: Path) -> dict[int, int]:
    """The failed ranks' exit codes (negative: killed by that signal), as the agent recorded them."""
    if not path.is_file():
        return {}
    return {int(rank): int(code) for rank, code in json.loads(path.read_text()).items()}


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1] if lines else "no output"


KEPT = "nothing was written, the finished steps are kept: run the same command again to continue"


def report(
    code: int, signalled: int | None, failures: dict[int, int], ranks: RankLogs, agent_said: str
) -> tuple[list[str], int]:
    """What to print (one line per distinct problem) and the exit code, from how the agent and its ranks ended."""
    if code == 0:
        return [], 0
    written = "the output was written" if ranks.wrote else "nothing was written"
    if ranks.kept and not ranks.wrote:  # an interrupted merge: its finished steps wait for the rerun
        written = KEPT
    if signalled is not None:
        said = "interrupted" if signalled == signal.SIGINT else "terminated"
        return [f"{said}; {written}"], 128 + signalled
    if not failures:
        return [f"internal error (torchrun exit {code}: {agent_said}); please report it"], 3
    own = [r for r in failures if not _only_peer_failed(ranks.errors.get(r))]  # not only "another rank failed"
    causes = [r for r in own if failures[r] not in STOPPED]
    causes = causes or own or [r for r, c in failures.items() if c not in STOPPED] or list(failures)
    said: dict[str, list[int]] = {}  # each distinct error, and the ranks that said it
    ended: dict[int, list[int]] = {}  # the ranks that said nothing, by exit code
    for rank in sorted(causes):
        for line in ranks.errors.get(rank, []):
            said.setdefault(line, []).append(rank)
        if rank not in ranks.errors:
            ended.setdefault(failures[rank], []).append(rank)
    lines = [f"{_ranks(numbers)}: {line.replace('nothing was written', written)}" for line, numbers in said.items()]
    lines += [f"{_ranks(numbers)} {_ended(c, len(numbers), written)}" for c, numbers in ended.items()]
    codes = [128 - c if c < 0 else c for c in (failures[r] for r in causes)]
    return lines, 3 if 3 in codes else next((c for c in codes if c != 2), 2)


def _only_peer_failed(errors: list[str] | None) -> bool:
    from regmean.distributed import PEER_FAILED

    return bool(errors) and all(PEER_FAILED in line for line in errors)


def _ended(code: int, ranks: int, written: str) -> str:
    """How ranks that said nothing ended (128 + N: stopped by signal N through Python's exit)."""
    if code in STOPPED and code > 0:
        code = 128 - code
    if code < 0:
        how = "terminated" if -code in (signal.SIGTERM, signal.SIGINT) else "killed"
        return f"{'was' if ranks == 1 else 'were'} {how} (signal {-code}); {written}"
    return f"exited with code {code}; {written}"


def _ranks(numbers: list[int]) -> str:
    if len(numbers) == 1:
        return f"rank {numbers[0]}"
    return f"ranks {', '.join(map(str, numbers[:-1]))} and {numbers[-1]}"


def _agent(parent: int, failures: Path, args: list[str]) -> int:
    """torchrun's agent, run by the launcher: the failed ranks' exit codes go to `failures` (JSON), not a
    traceback; it stops its ranks if the launcher dies."""
    import logging

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    _die_with_parent(parent)
    logging.getLogger("torch.distributed.elastic").setLevel(logging.ERROR)
    try:
        run(get_args_parser().parse_args(args))
    except ChildFailedError as exc:
        failures.write_text(json.dumps({rank: f.exitcode for rank, f in exc.failures.items()}))
        return 1
    except SignalException as exc:
        if os.getppid() != parent:  # the launcher died: its folder is left to no one
            shutil.rmtree(failures.parent, ignore_errors=True)
        return 128 + int(exc.sigval)
    return 0


def _die_with_parent(parent: int) -> None:
    """Ask Linux for SIGTERM when the launcher dies (even by SIGKILL), so that the ranks are stopped, not orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:  # it died before that
        sys.exit(128 + signal.SIGTERM)


if __name__ == "__main__":
    sys.exit(_agent(int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]))
