"""What every launcher shares: flag parsing whose failures (a missing config file, a misspelt
config field, a bad flag value) end in one ``error: ...`` line, and a ``main`` wrapper that turns
the project's user-facing errors into the same one line instead of a traceback (``-v 1`` keeps
the traceback, for debugging).

    from common import run      # launch/ is the script's directory, so this resolves here
    ...
    if __name__ == "__main__":
        run(main)
"""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Sequence

from absl import app, flags, logging

# (module, class) of the errors whose message is meant for the user. Checked through sys.modules:
# an exception of a class whose module was never imported cannot have been raised.
USER_ERRORS = (
    ("free_transformer_jax.model.config", "ConfigError"),
    ("free_transformer_jax.sharding", "MeshError"),
    ("free_transformer_jax.checkpoint", "CheckpointError"),
    ("free_transformer_jax.trainer", "TrainingError"),
    ("free_transformer_jax.fs", "FsError"),
    ("free_transformer_jax.evaluate", "ChoiceTaskError"),
    ("free_transformer_jax.generate", "PromptError"),
    ("free_transformer_jax.data.local_tfds", "CorpusError"),
)


def one_line(message: str) -> str:
    return " ".join(line.strip() for line in str(message).strip().splitlines() if line.strip())


def fail(message: str) -> None:
    """Exits with status 1 and one ``error: ...`` line on stderr."""
    sys.exit(f"error: {one_line(message)}")


def is_user_error(e: BaseException) -> bool:
    for module, name in USER_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return True
    return False


def _config_file_flags(flag_values: flags.FlagValues) -> list[str]:
    return [name for name, flag in flag_values._flags().items()  # pylint: disable=protected-access
            if config_flag_is_file(flag)]


def config_flag_is_file(flag) -> bool:
    from ml_collections.config_flags import config_flags as cf  # the module behind the package

    return cf.is_config_flag(flag) and isinstance(flag.parser, cf.ConfigFileFlagParser)


def _flag_values(argv: Sequence[str], name: str) -> list[str]:
    """The values given to ``--name`` in ``argv`` (``--name=v`` or ``--name v``)."""
    out = []
    for i, a in enumerate(argv):
        if a.startswith(f"--{name}="):
            out.append(a.split("=", 1)[1])
        elif a == f"--{name}" and i + 1 < len(argv):
            out.append(argv[i + 1])
    return out


def _describe_config_error(argv: Sequence[str], names: list[str], e: Exception) -> str:
    """One line for an exception raised while loading a config file or applying an override."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    text = str(text).strip().strip("'\"").replace("\\n", "\n").replace("\\'", "'")
    missing = re.match(r"'?([A-Za-z_][\w]*)'?\s*(?:\n|$)", text)
    hint = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
    if missing or hint:
        field = hint.group(2) if hint else missing.group(1)
        flag = next((a.split("=", 1)[0] for a in argv
                     if any(a.startswith(f"--{n}.") for n in names) and
                     re.search(rf"\.{re.escape(field)}(\.|=|$)", a.split("=", 1)[0])), None)
        where = flag or f"--{names[0] if names else 'config'}...{field}"
        suggestion = f"; did you mean {hint.group(1)!r}?" if hint else ""
        return (f"{where}: the config has no field {field!r}{suggestion} (run with --helpfull to "
                "list the fields)")
    return f"loading the config failed: {type(e).__name__}: {one_line(text)}"


def parse_flags(argv: Sequence[str], flag_values: flags.FlagValues | None = None) -> list[str]:
    """absl flag parsing with one-line errors (the ``flags_parser`` of :func:`run`)."""
    flag_values = flags.FLAGS if flag_values is None else flag_values
    names = _config_file_flags(flag_values)
    for name in names:
        for value in _flag_values(argv, name):
            file = value.split(":", 1)[0]
            if not os.path.isfile(file):
                fail(f"--{name}={value}: no such config file {file!r}; pass a file such as "
                     "configs/demo.py")
    try:
        return flag_values(list(argv))
    except flags.Error as e:
        text = str(e)
        if "Traceback (most recent call last)" in text:  # the config file's own code raised
            lines = [x.strip() for x in text.splitlines() if x.strip()]
            fail(f"{text.split('Traceback')[0].strip()} {lines[-1]}")
        fail(f"{text} (pass --helpfull to list the flags)")
    except (AttributeError, KeyError, TypeError, ValueError, OSError, SyntaxError, ImportError) as e:
        fail(_describe_config_error(argv, names, e))
    raise AssertionError("unreachable")


def _verbose() -> bool:
    """``-v 1`` (or more) was passed: keep tracebacks for debugging."""
    try:
        return flags.FLAGS["verbosity"].value >= 1
    except (KeyError, flags.Error):
        return logging.get_verbosity() >= logging.DEBUG


def guard(main: Callable[[list[str]], None]) -> Callable[[list[str]], None]:
    """``main`` with the project's user-facing errors printed as one line (exit status 1)."""
    def wrapped(argv):
        try:
            return main(argv)
        except Exception as e:  # noqa: BLE001  (re-raised unless it is a user-facing error)
            if not is_user_error(e) or _verbose():
                raise
            fail(str(e))
    return wrapped


def run(main: Callable[[list[str]], None]) -> None:
    """``absl.app.run`` with :func:`parse_flags` and :func:`guard`."""
    app.run(guard(main), flags_parser=parse_flags)
