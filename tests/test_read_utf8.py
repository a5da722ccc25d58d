"""errors.read_utf8 closes the file it reads (no ResourceWarning for an unclosed handle), on success and on error."""

from __future__ import annotations

import gc
import warnings

import pytest

from unipelt.errors import DataError, read_utf8


def _unclosed(call) -> list[warnings.WarningMessage]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
        gc.collect()
    return [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_read_utf8_closes_its_file(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_bytes("\ufeffname: x\n".encode("utf-8"))
    assert read_utf8(good, DataError, "task file") == "name: x\n"
    assert _unclosed(lambda: read_utf8(good, DataError, "task file")) == []

    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"name: x\n\xff\n")

    def read_bad():
        with pytest.raises(DataError, match=r"task file: .*bad.yaml is not UTF-8 text \(line 2: byte b'\\xff'\)"):
            read_utf8(bad, DataError, "task file")

    assert _unclosed(read_bad) == []
