import subprocess
import sys
import textwrap

from edgekd import console as console_module
from edgekd.console import progress

# In a child process, so that its stderr is a pipe this test reads, as a terminal would show it.
_CHILD = textwrap.dedent(
    """
    import os, subprocess, sys, warnings
    from pathlib import Path

    import edgekd.cli  # installs the warning hook the command line runs with
    from edgekd.console import err, library_output
    from edgekd.errors import EdgekdWarning

    print("before", file=sys.stderr, flush=True)
    with library_output(Path(sys.argv[1]), "stage"):
        print("python stderr", file=sys.stderr)
        os.write(2, b"native stderr\\n")
        subprocess.run([sys.executable, "-c", "import sys; sys.stderr.write('child stderr')"])
        warnings.warn("a library's deprecation", DeprecationWarning, stacklevel=1)
        warnings.warn("edgekd's advice", EdgekdWarning, stacklevel=1)
        err().print("error: edgekd's own line")
    print("after", file=sys.stderr, flush=True)
    """
)


def test_library_output_goes_to_the_log_and_edgekds_lines_to_the_terminal(tmp_path):
    log = tmp_path / "log.txt"
    done = subprocess.run(
        [sys.executable, "-W", "always", "-c", _CHILD, str(log)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    terminal, logged = done.stderr, log.read_text()
    for text in ("python stderr", "native stderr", "child stderr", "a library's deprecation"):
        assert text in logged and text not in terminal, text
    assert logged.startswith("--- stage (")
    assert "warning: edgekd's advice" in terminal and "edgekd's advice" not in logged
    assert "error: edgekd's own line" in terminal
    assert terminal.index("before") < terminal.index("after")  # stderr is restored after


def test_library_output_refuses_a_link_in_the_logs_place(tmp_path):
    import pytest

    from edgekd.errors import EdgekdError
    from edgekd.pipeline import library_log

    target = tmp_path / "elsewhere.txt"
    (tmp_path / "log.txt").symlink_to(target)
    with (
        pytest.raises(EdgekdError, match="symbolic link"),
        library_log(tmp_path / "log.txt", "stage", verbose=False),
    ):
        pass
    assert not target.exists()


def test_verbose_leaves_the_libraries_on_the_terminal(tmp_path):
    from edgekd.pipeline import library_log

    with library_log(tmp_path / "log.txt", "stage", verbose=True):
        assert console_module._library_log is None
    assert not (tmp_path / "log.txt").exists()


def test_progress_without_a_terminal_prints_plain_lines(monkeypatch, capsys):
    monkeypatch.setattr(console_module, "PLAIN_PROGRESS_SECONDS", 0.0)
    monkeypatch.setattr(console_module.console, "_force_terminal", False)
    with progress("Teacher answers (test)", 3) as advance:
        for _ in range(3):
            advance()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("Teacher answers (test): 1/3 (") and "left)" in lines[0]
    assert lines[1].startswith("Teacher answers (test): 2/3 (")
    assert lines[-1].startswith("Teacher answers (test): 3/3 (") and "left" not in lines[-1]
    assert len(lines) == 3
