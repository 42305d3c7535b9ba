"""Progress output: lines in a log, tqdm's in-place bar only on a terminal."""

import io

from selfflow.progress import progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_log_gets_whole_lines_and_a_terminal_the_bar():
    log = io.StringIO()
    for _ in progress(range(5), desc="train", file=log, mininterval=0, miniters=1):
        pass
    text = log.getvalue()
    assert "\r" not in text and text.endswith("\n")
    lines = text.splitlines()
    assert lines[-1].startswith("train: 100%") and "5/5" in lines[-1]
    assert all(line.startswith("train:") for line in lines)

    terminal = Terminal()
    for _ in progress(range(5), desc="train", file=terminal, mininterval=0, miniters=1):
        pass
    assert "\r" in terminal.getvalue()  # tqdm's own refresh, untouched
