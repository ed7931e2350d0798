"""Disk hygiene: the caches are listed, capped and evicted least recently used first; `python -m backend cache`."""
import os
import time

import pytest

import backend
from backend.disk import caches as cache_dir
from tests.backend import bad_files as bf


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FORNAX_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cache_dir.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))  # not the shared /tmp


def entry(area_folder, name, n_bytes, age_s):
    folder = area_folder / name
    folder.mkdir(parents=True)
    (folder / "blob").write_bytes(b"\0" * n_bytes)
    t = time.time() - age_s
    os.utime(folder, (t, t))
    return folder


def test_evict_removes_least_recently_used_first_down_to_the_cap(tmp_path):
    areas = cache_dir.areas()
    old = entry(areas["gguf"], "old", 1000, 300)
    mid = entry(areas["exports"], "mid", 1000, 200)
    new = entry(areas["zips"], "new", 1000, 100)
    cache_dir.touch(old)                                  # used just now: the newest
    assert [e.path for e in cache_dir.entries()] == [mid, new, old]
    removed = cache_dir.evict(2000)
    assert [e.path for e in removed] == [mid] and old.exists() and new.exists() and not mid.exists()
    assert cache_dir.evict(0, keep=(old,)) and old.exists() and not new.exists()


def test_stale_temporary_folders_are_swept_and_fresh_ones_kept(tmp_path):
    gguf = cache_dir.areas()["gguf"]
    stale = entry(gguf, ".tmp-dead", 10, cache_dir.STALE_TEMP_S + 60)
    fresh = entry(gguf, ".tmp-live", 10, 1)
    assert cache_dir.entries() == [] and not stale.exists() and fresh.exists()


def test_gguf_conversions_are_evicted_by_the_cap(tmp_path, monkeypatch):
    a = backend.formats.gguf.convert_gguf(bf.tiny_gguf(tmp_path / "a.gguf"))
    size = cache_dir.entries()[0].bytes
    monkeypatch.setenv("FORNAX_CACHE_BYTES", str(int(size * 1.5)))  # room for one conversion
    b = backend.formats.gguf.convert_gguf(bf.tiny_gguf(tmp_path / "b.gguf", context=32))
    assert b.exists() and not a.exists()
    assert backend.formats.gguf.convert_gguf(tmp_path / "b.gguf") == b   # a hit is touched, not converted again


def test_cli_lists_and_clears(tmp_path, capsys):
    import backend.__main__ as cli

    e = entry(cache_dir.areas()["uploads"], "upload-1", 5000, 10)
    assert cli.main(["cache"]) == 0
    out = capsys.readouterr().out
    assert "uploads" in out and str(e) in out and "1 entries" in out
    assert cli.main(["cache", "--clear"]) == 0
    assert "cleared 1 entries" in capsys.readouterr().out and not e.exists()
