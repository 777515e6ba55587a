"""zsad_jax/text_cache.py: where files go, what they are keyed by, atomic writes, batching.

Proofs: the directory rule (``$ZSAD_TEXT_CACHE`` first, ``off`` disables it, else next to a
converted encoder, else none for random weights); a value round-trips and leaves no temporary
file; a truncated, foreign or wrong-shaped file reads as missing; an unwritable directory warns
once and keeps the value in memory; the key changes with the weights, the architecture, the tag,
the prompt ids and the extra field, and not with array identity; ``encode_in_batches`` runs fixed
batches (last one padded), returns exactly the rows and shows a bar on stderr; ``cached_per_class``
computes only the missing classes, once.
"""

from __future__ import annotations

import sys
import warnings

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from zsad_jax import text_cache


@pytest.fixture(autouse=True)
def _fresh_memory(monkeypatch):
    monkeypatch.delenv(text_cache.ENV_VAR, raising=False)
    text_cache.clear_memory()
    yield
    text_cache.clear_memory()


def test_cache_dir_rule(tmp_path, monkeypatch):
    assert text_cache.cache_dir(None, random_init=True) is None
    assert text_cache.cache_dir(str(tmp_path), random_init=True) is None  # random weights
    assert text_cache.cache_dir(None, random_init=False) is None
    assert text_cache.cache_dir(str(tmp_path), random_init=False) == tmp_path / "text_cache"
    monkeypatch.setenv(text_cache.ENV_VAR, str(tmp_path / "elsewhere"))
    assert text_cache.cache_dir(None, random_init=True) == tmp_path / "elsewhere"
    assert text_cache.cache_dir(str(tmp_path), random_init=False) == tmp_path / "elsewhere"
    for off in ("", "off", "0", "OFF"):
        monkeypatch.setenv(text_cache.ENV_VAR, off)
        assert text_cache.cache_dir(str(tmp_path), random_init=False) is None


def test_round_trip_is_atomic_and_bad_files_read_as_missing(tmp_path):
    value = np.arange(6, dtype=np.float32).reshape(2, 3)
    text_cache.save(tmp_path, "metal nut/1", "abc", value)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["metal_nut_1-abc.npy"]  # no temporary file left, name made safe
    text_cache.clear_memory()
    np.testing.assert_array_equal(text_cache.load(tmp_path, "metal nut/1", "abc", (2, 3)), value)
    assert text_cache.load(tmp_path, "metal nut/1", "abc", (3, 2)) is None  # wrong shape
    assert text_cache.load(tmp_path, "metal nut/1", "other", (2, 3)) is None  # other key
    text_cache.clear_memory()
    (tmp_path / files[0]).write_bytes(b"\x93NUMPY truncated")
    assert text_cache.load(tmp_path, "metal nut/1", "abc", (2, 3)) is None
    np.save(tmp_path / files[0], np.full((2, 3), np.nan, np.float32))
    assert text_cache.load(tmp_path, "metal nut/1", "abc", (2, 3)) is None  # not finite
    assert text_cache.load(None, "metal nut/1", "abc", (2, 3)) is None


def test_unwritable_directory_warns_once_and_keeps_the_value(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    value = np.ones((2, 2), np.float32)
    with pytest.warns(UserWarning, match="cannot write class text"):
        text_cache.save(blocker, "x", "k1", value)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_cache.save(blocker, "y", "k2", value)  # no second warning for the same directory
    np.testing.assert_array_equal(text_cache.load(blocker, "x", "k1", (2, 2)), value)


def _linear(seed: int) -> nnx.Linear:
    return nnx.Linear(3, 2, rngs=nnx.Rngs(seed))


def test_key_follows_weights_architecture_tag_and_prompts():
    a, b = _linear(0), _linear(0)
    ids = np.arange(12, dtype=np.int32).reshape(3, 4)
    key_a = text_cache.CacheKey(a, "tag/1")
    assert key_a.of(ids) == text_cache.CacheKey(b, "tag/1").of(ids)  # same values, other arrays
    assert key_a.of(ids) == text_cache.CacheKey(a, "tag/1").of(ids)  # memoised: same answer
    assert key_a.of(ids) != text_cache.CacheKey(a, "tag/2").of(ids)
    assert key_a.of(ids) != key_a.of(ids[:, :3])
    assert key_a.of(ids) != key_a.of(ids + 1)
    assert key_a.of(ids, "normal=1") != key_a.of(ids, "normal=2")
    b.kernel[...] = b.kernel[...] + 1e-6
    assert text_cache.CacheKey(b, "tag/1").of(ids) != key_a.of(ids)
    assert text_cache.CacheKey(nnx.Linear(3, 4, rngs=nnx.Rngs(0)), "tag/1").of(ids) != key_a.of(ids)


def test_encode_in_batches_pads_the_last_batch_and_shows_progress(capsys):
    calls = []

    def encode(chunk):
        calls.append(chunk.shape)
        return jnp.asarray(chunk, jnp.float32) * 2.0

    ids = np.arange(20, dtype=np.int32).reshape(10, 2)
    out = text_cache.encode_in_batches(encode, ids, batch=4, desc="probe")
    assert calls == [(4, 2)] * 3  # one compiled shape for every call
    np.testing.assert_array_equal(out, ids * 2.0)
    assert out.dtype == np.float32
    captured = capsys.readouterr()
    assert "probe" in captured.err and captured.out == ""


def test_progress_bars_redraw_rarely_when_stderr_is_a_log_file(monkeypatch):
    """Off a terminal (a log file, a pod's log) every redraw is appended to the log: the bars of
    ``report.progress_bar`` (train, evaluate, predict and this module's) redraw every
    ``LOG_REFRESH_SECONDS`` there, where tqdm's own 0.1 s gave a redraw per few steps."""
    import io
    import time

    from zsad_jax import report

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    redraws = {}
    for name, stream in [("log", io.StringIO()), ("terminal", Terminal())]:
        monkeypatch.setattr(sys, "stderr", stream)
        bar = report.progress_bar(40, enabled=True, desc="probe", unit="step")
        for _ in range(40):
            time.sleep(0.02)
            bar.update(1)
        bar.close()
        redraws[name] = stream.getvalue().count("probe")
    assert report.LOG_REFRESH_SECONDS >= 30
    assert redraws["log"] <= 2  # the first draw and the final one
    assert redraws["terminal"] >= 4


def test_cached_per_class_computes_only_what_is_missing(tmp_path):
    key = text_cache.CacheKey(_linear(0), "tag/1")
    prompts = {n: (np.full((2, 3), i, np.int32), "") for i, n in enumerate(["a", "b", "c"])}
    computed = []

    def compute(missing):
        computed.append(list(missing))
        return [np.full((2,), 3.0 * ids[0, 0], np.float32) for ids, _ in missing.values()]

    first = text_cache.cached_per_class(
        dict(list(prompts.items())[:2]), key, tmp_path, compute, (2,)
    )
    assert computed == [["a", "b"]]
    text_cache.clear_memory()
    found = text_cache.cached_per_class(prompts, key, tmp_path, compute, (2,))
    assert computed == [["a", "b"], ["c"]]  # a and b from disk, c computed once
    np.testing.assert_array_equal(found["a"], first["a"])
    np.testing.assert_array_equal(found["c"], [6.0, 6.0])
    assert len(list(tmp_path.glob("*.npy"))) == 3
    text_cache.cached_per_class(prompts, key, None, compute, (2,))  # in memory, no disk
    assert len(computed) == 2
