"""Error types. Every message is one line that names the culprit (key, site, module) and, where it helps,
the allowed values, so a researcher sees what to fix without a traceback dive."""

from __future__ import annotations


class UnipeltError(Exception):
    """Base class of every error unipelt raises on purpose."""


class MethodConfigError(UnipeltError, ValueError):
    """A method spec (preset, YAML, dict) is malformed: unknown key, wrong type, bad value or combination."""


class AttachError(UnipeltError, ValueError):
    """The method cannot be attached to this model (site missing, family unsupported, already attached...)."""


class AdapterFileError(UnipeltError, ValueError):
    """An adapter directory cannot be loaded onto this model (missing / extra / corrupt tensors, wrong base)."""


class DataError(UnipeltError, ValueError):
    """A task config or its data is unusable: unknown key / kind / metric, missing file or column, bad label."""


def one_line(message: str) -> str:
    """Collapse whitespace so that a message stays on one line even when built from multi-line pieces."""
    return " ".join(message.split())


def allowed(values) -> str:
    return ", ".join(str(v) for v in values)


def read_utf8(path, error: type[UnipeltError], where: str) -> str:
    """A text file as UTF-8 (a leading BOM is dropped), or one `error` line naming the file and the first bad line."""
    with open(path, "rb") as handle:  # closed here, not whenever the file object happens to be collected
        data = handle.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise error(f"{where}: {path} is not UTF-8 text (line {line}: byte {data[exc.start:exc.start + 1]!r}); "
                    "save it as UTF-8") from None
