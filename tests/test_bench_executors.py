"""The same tiny sweep gives identical results in this process, in a local pool and on a local Ray."""

from __future__ import annotations

import numpy as np
import pytest

from tests.bench_util import tiny_suite
from tuneless.bench import InlineExecutor, LocalExecutor, RayExecutor, ResultStore, run_sweep

SUITE = dict(problems=(("logreg_wine", 30), ("rosenbrock", 40)), methods=("polyak", "sps"))


def _sweep(db, executor):
    with ResultStore(db) as store, executor:
        stats = run_sweep(tiny_suite(**SUITE), store, executor)
        records = {r.key: r for r in store.records()}
    assert stats.executed == stats.planned == len(records)
    return records


def _assert_identical(a, b):
    assert set(a) == set(b)
    for key in a:
        ra, rb = a[key], b[key]
        assert (ra.status, ra.steps_done, ra.error) == (rb.status, rb.steps_done, rb.error), key
        np.testing.assert_equal(ra.final, rb.final, err_msg=key)  # NaN equals NaN here
        np.testing.assert_array_equal(ra.loss, rb.loss, err_msg=key)
        np.testing.assert_array_equal(ra.step_size, rb.step_size, err_msg=key)
        if ra.positions is not None or rb.positions is not None:
            np.testing.assert_array_equal(ra.positions, rb.positions, err_msg=key)


@pytest.fixture(scope="module")
def inline_results(tmp_path_factory):
    return _sweep(tmp_path_factory.mktemp("inline") / "i.sqlite", InlineExecutor())


@pytest.mark.timeout(300)
def test_local_pool_matches_inline(tmp_path, inline_results):
    db = tmp_path / "pool.sqlite"
    _assert_identical(inline_results, _sweep(db, LocalExecutor(2, db)))


@pytest.mark.timeout(300)
def test_ray_matches_inline(tmp_path, inline_results):
    """Starts a local Ray instance with 2 CPUs and stops it when the sweep ends."""
    import ray

    assert not ray.is_initialized()
    executor = RayExecutor(address=None, workers=2)
    try:
        assert ray.is_initialized()
        records = _sweep(tmp_path / "ray.sqlite", executor)
    finally:
        executor.close()
    assert not ray.is_initialized(), "the executor must stop the Ray instance it started"
    _assert_identical(inline_results, records)
