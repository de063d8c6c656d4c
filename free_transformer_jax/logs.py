"""Console logging for the launch scripts.

Library messages go through absl ``logging`` at the verbosity the launcher's ``-v`` flag sets
(absl's default under ``app.run``: INFO). Orbax and Grain log every step of every checkpoint save
at INFO (about 70 lines per save, measured with ``launch/train.py`` on the demo config), which
would bury the progress lines; :class:`LibraryChatterFilter` shows their INFO records only at
``-v=1`` or more. Their warnings and errors always show.
"""

from __future__ import annotations

import logging as std_logging
import os

from absl import logging

# packages whose INFO records need -v=1 (matched against a directory of the record's source path)
CHATTY_PACKAGES = ("orbax", "grain")


class LibraryChatterFilter(std_logging.Filter):
    """Drops INFO (and lower) records emitted from ``packages`` while absl verbosity is below 1."""

    def __init__(self, packages: tuple[str, ...] = CHATTY_PACKAGES):
        super().__init__()
        self.packages = frozenset(packages)

    def filter(self, record: std_logging.LogRecord) -> bool:
        if record.levelno > std_logging.INFO or logging.get_verbosity() >= 1:
            return True
        return not self.packages.intersection(os.path.normpath(record.pathname).split(os.sep))


def setup_console_logging() -> None:
    """Installs :class:`LibraryChatterFilter` on absl's handler (idempotent). Call it from a
    launcher's ``main`` (after flags are parsed)."""
    handler = logging.get_absl_handler()
    if not any(isinstance(f, LibraryChatterFilter) for f in handler.filters):
        handler.addFilter(LibraryChatterFilter())
