"""Helpers shared by the tests that drive the command line."""

from __future__ import annotations

from hfmerge.cli import main


def run_cli(args, capsys):
    try:
        code = main([str(a) for a in args])
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *fragments):
    assert code == 2
    # what a terminal shows: a progress bar erased with carriage returns leaves no line behind
    lines = [shown for line in err.split("\n") if (shown := line.split("\r")[-1]).strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("hfmerge: error: ")
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
