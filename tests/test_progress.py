"""The progress bar shows on a terminal only; ``progress=false`` turns it off everywhere."""

from __future__ import annotations

import io

import pytest

from easgd.parts.progress import Progress, is_terminal


class Terminal(io.StringIO):
    """A stream that says it is a TTY (what a console is)."""

    def isatty(self) -> bool:
        if self.closed:  # as a real file does
            raise ValueError("I/O operation on closed file")
        return True


@pytest.mark.parametrize(
    ("stream", "enabled", "shown"),
    [(Terminal(), True, True), (Terminal(), False, False), (io.StringIO(), True, False)],
    ids=["terminal", "terminal-progress-false", "batch-log"],
)
def test_the_bar_draws_only_on_a_terminal_and_when_asked(
    stream: io.StringIO, enabled: bool, shown: bool
) -> None:
    bar = Progress(100, enabled=enabled, stream=stream)
    bar.advance(40, exchanges=10)
    bar.note(test_error=0.125)
    bar.close()
    assert bar.shown is shown
    text = stream.getvalue()
    # a drawn bar counts the steps and shows the test error; a batch log gets not one character
    assert ("40/100" in text and "test_err=12.50%" in text) if shown else text == ""


def test_closed_or_plain_streams_are_not_terminals() -> None:
    closed = Terminal()
    closed.close()
    assert (is_terminal(Terminal()), is_terminal(closed), is_terminal(io.StringIO())) == (
        True,
        False,
        False,
    )
