"""Smoke test of the step-speed benchmark (benchmarks/step_speed.py) on tiny sizes.

Checks the structure and the sanity of what the benchmark reports (state memory, host-sync
counts, bytes of the bound, ratios that are positive numbers), never timing itself.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from tests.bench_util import load_step_speed

ss = load_step_speed()

SHAPES = ss.transformer_shapes(d_model=16, layers=2)  # 32 tensors, 6560 floats


@pytest.fixture(scope="module")
def rows():
    refs = [c for c in ss.reference_candidates() if c.label == "dadaptation.DAdaptAdam"]
    cands = ss.registry_candidates(["adam", "polyak"]) + refs
    assert len(cands) == 3
    out = ss.run_set("tiny", SHAPES, cands, reps=2, steps_per_rep=1, probe_numel=1 << 16)
    return {r.label: r for r in out}


def test_rows_structure_and_positive_ratios(rows) -> None:
    assert list(rows) == ["torch.optim.Adam(foreach=True)", "torch.optim.Adam(fused=True)", "adam", "polyak",
                          "dadaptation.DAdaptAdam"]
    for r in rows.values():
        assert r.error is None, r
        assert r.set == "tiny"
        for value in (r.x_adam_foreach, r.x_adam_fused, r.x_bound, r.bandwidth_gbs, r.median_step_ms):
            assert math.isfinite(value) and value > 0, r
    assert rows["torch.optim.Adam(foreach=True)"].x_adam_foreach == 1.0
    assert rows["torch.optim.Adam(fused=True)"].x_adam_fused == 1.0


def test_state_memory_per_parameter(rows) -> None:
    # torch Adam: exp_avg and exp_avg_sq (8 B/param in fp32) plus a 4-byte step per tensor
    n, tensors = ss.numel(SHAPES), len(SHAPES)
    for label in ("torch.optim.Adam(foreach=True)", "torch.optim.Adam(fused=True)", "adam"):
        assert rows[label].state_bytes_per_param == pytest.approx(8 + 4 * tensors / n, rel=1e-9)
    assert rows["dadaptation.DAdaptAdam"].state_bytes_per_param == pytest.approx(12, abs=0.1)  # s, m, v
    assert rows["polyak"].state_bytes_per_param < 1  # only scalars


def test_state_is_what_a_checkpoint_carries_and_workspace_the_rest() -> None:
    """Mechanic's reused copy of x_t (on the CPU by default) is held between steps but never
    saved: workspace, not state; allocated per step, it is neither."""
    n = ss.numel(SHAPES)
    for spec, workspace in (("mechanic", 4.0), ("mechanic:reuse_buffer=False", 0.0)):
        (cand,) = ss.registry_candidates(None, [spec])[-1:]
        assert cand.label == spec
        opt = cand.build(ss.make_params(SHAPES, torch.device("cpu"), 3))
        step = ss.step_function(opt)
        step()
        row = ss.Row("tiny", spec, "mechanic", "tuneless")
        ss.fill_memory(row, opt, n)
        # Adam's m and v, Mechanic's Delta (4 B/param), a 4-byte step per tensor and the tuner's scalars
        assert row.state_bytes_per_param == pytest.approx(12 + 4 * len(SHAPES) / n, abs=0.05)
        assert row.workspace_bytes_per_param == pytest.approx(workspace, abs=1e-9)
        assert ss.state_bytes(opt) / n == pytest.approx(row.state_bytes_per_param + workspace, rel=1e-12)


def test_sync_counts(rows) -> None:
    for label in ("torch.optim.Adam(foreach=True)", "torch.optim.Adam(fused=True)", "adam", "polyak"):
        assert rows[label].syncs_per_step == 0, label
    # the authors' D-Adapt Adam reads two scalars per tensor (.item() per dot product and norm)
    assert rows["dadaptation.DAdaptAdam"].syncs_per_step == 2 * len(SHAPES)


def test_bound_bytes(rows) -> None:
    assert rows["adam"].bound_bytes == 28
    assert rows["polyak"].bound_bytes == 16
    assert rows["dadaptation.DAdaptAdam"].bound_bytes == 36
    params = ss.make_params([(10, 10)], torch.device("cpu"))
    opt = torch.optim.Adam(params)
    opt.step()
    nbytes, note = ss.bound_bytes("an-unlisted-optimizer", opt)
    assert nbytes == 12 + 8 * 2 and "generic" in note  # two state buffers: m, v
    assert ss.bound_bytes("Prodigy", torch.optim.Adam(params, betas=(0.9, 0.999)))[0] == 40


def test_sync_counter_ignores_host_side_step_counters() -> None:
    """torch's foreach Adam reads its CPU step counters in its step: exempted (by where the read
    comes from: torch/optim), not counted; any other read, from Python or inside an op, counts."""
    params = ss.make_params([(4, 4), (3,)], torch.device("cpu"))
    opt = torch.optim.Adam(params, foreach=True)
    opt.step()
    with ss.SyncCounter() as raw:
        opt.step()
    assert raw.count == 0 and raw.exempted > 0
    assert ss.count_syncs(opt.step) == 0
    with ss.SyncCounter() as counter:
        float(torch.tensor(1.0))                                  # Python level
        torch._foreach_add_([torch.zeros(2)], torch.tensor(1.0))  # a 0-d tensor as a Scalar: inside the op
    assert (counter.python, counter.aten) == (1, 1), counter.sites


def test_references_linked_and_targets_checked() -> None:
    row = ss.Row("many-small", "dadapt_adam", "dadapt_adam", "tuneless", x_adam_foreach=1.0, x_bound=5.0,
                 bound_bytes=36, state_bytes_per_param=16.0)
    ref = ss.Row("many-small", "dadaptation.DAdaptAdam", "dadaptadam", "reference", x_adam_foreach=2.0,
                 x_bound=9.0, state_bytes_per_param=12.0)
    cands = [c for c in ss.reference_candidates() if c.label == "dadaptation.DAdaptAdam"]
    ss.link_references([row, ref], cands)
    assert row.reference == "dadaptation.DAdaptAdam"
    assert row.speedup_vs_reference == 2.0
    misses = ss.check_targets([row, ref])
    assert len(misses) == 2  # 5x its bound, and more state than the reference
    assert "5.00x its bound" in misses[0] and "state 16.0" in misses[1]
    row.x_adam_foreach = 1.8  # only 1.11x faster: issue 3 asks 1.3x
    ss.link_references([row, ref], cands)
    assert any("1.11x faster than dadaptation.DAdaptAdam (target >= 1.3x)" in m for m in ss.check_targets([row]))


def test_command_line_writes_markdown_and_json(tmp_path, capsys) -> None:
    out, js = tmp_path / "speed.md", tmp_path / "speed.json"
    threads = torch.get_num_threads()
    rc = ss.main(["--quick", "--only", "polyak", "--references", "none", "--sets", "few-large", "--reps", "1",
                  "--probe-floats", "100000", "--markdown", "--out", str(out), "--json", str(js)])
    assert rc == 0
    assert torch.get_num_threads() == threads  # main restores the process settings
    text = out.read_text()
    assert "| polyak | tuneless |" in text and "torch: " + torch.__version__ in text
    assert text in capsys.readouterr().out
    assert '"label": "polyak"' in js.read_text()
    # --update merges a later run of other optimizers into the earlier run's rows
    rc = ss.main(["--quick", "--only", "sps", "--references", "none", "--sets", "few-large", "--reps", "1",
                  "--probe-floats", "100000", "--update", str(js), "--out", str(out)])
    assert rc == 0
    text = out.read_text()
    assert "| polyak | tuneless |" in text and "| sps | tuneless |" in text
    assert "- updates:\n  - " in text and "re-measured sps" in text
    # --render prints the same tables from the file, measuring nothing
    capsys.readouterr()
    assert ss.main(["--render", str(js), "--out", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == text and text in capsys.readouterr().out
    (tmp_path / "other.json").write_text('{"meta": {"parameter sets": "gone: 1 tensors"}, "rows": []}')
    with pytest.raises(SystemExit, match="none this version knows"):
        ss.main(["--render", str(tmp_path / "other.json")])
    with pytest.raises(SystemExit, match="parameter sets"):
        ss.main(["--quick", "--only", "sps", "--references", "none", "--reps", "1", "--update", str(js)])
    with pytest.raises(tuneless_errors().UnknownNameError, match="did you mean"):
        ss.main(["--quick", "--only", "polyac", "--references", "none"])


def test_env_runs_the_measurement_in_a_child_process_with_it_set(tmp_path) -> None:
    js = tmp_path / "env.json"
    rc = ss.main(["--env", "TUNELESS_STEP_SPEED_TEST=1", "--quick", "--only", "polyak", "--references", "none",
                  "--sets", "few-large", "--reps", "1", "--probe-floats", "100000", "--json", str(js)])
    assert rc == 0
    saved = json.loads(js.read_text())
    assert saved["meta"]["environment"] == "TUNELESS_STEP_SPEED_TEST=1"
    assert [r["label"] for r in saved["rows"]][-1] == "polyak"
    assert "TUNELESS_STEP_SPEED_TEST" not in os.environ  # this process is left as it was
    with pytest.raises(SystemExit, match=r"--env 'THP' is invalid; allowed: NAME=VALUE"):
        ss.main(["--env", "THP", "--quick"])


def tuneless_errors():
    import tuneless.errors

    return tuneless.errors


def test_an_interrupted_set_keeps_the_rows_measured() -> None:
    def stop(params):
        raise KeyboardInterrupt

    cands = ss.registry_candidates(["polyak"]) + [ss.Candidate("stopper", "stopper", "torch", stop)]
    with pytest.raises(ss.Interrupted) as info:
        ss.run_set("tiny", SHAPES, cands, reps=1, steps_per_rep=1, probe_numel=1 << 12)
    labels = [r.label for r in info.value.rows]
    assert labels == ["torch.optim.Adam(foreach=True)", "torch.optim.Adam(fused=True)", "polyak"]
    assert info.value.rows[-1].x_adam_foreach > 0


class _Wrapper(torch.optim.Optimizer):
    """A minimal wrapper holding a base optimizer, as Mechanic and Schedule-Free do."""

    def __init__(self, base: torch.optim.Optimizer) -> None:
        self.base = base
        super().__init__(base.param_groups, {})

    def step(self, closure=None):
        return self.base.step(closure)


def test_a_wrapper_is_timed_against_its_base() -> None:
    build = lambda ps: _Wrapper(torch.optim.SGD(ps, lr=0.1, momentum=0.9))  # noqa: E731
    out = ss.run_set("tiny", SHAPES, [ss.Candidate("wrapped-sgd", "wrapped-sgd", "torch", build)],
                     reps=2, steps_per_rep=1, probe_numel=1 << 12)
    row = out[-1]
    assert row.error is None and row.base_label == "sgd"
    assert row.base_bound_bytes == 20  # SGD with momentum
    assert row.x_base > 0 and math.isfinite(row.overhead_bytes)
    # the base's momentum buffer is counted, as state: the base's state_dict carries it
    assert row.state_bytes_per_param == pytest.approx(4) and row.workspace_bytes_per_param == 0
    text = ss.format_markdown(out, {"tiny": SHAPES}, {})
    assert "## Wrappers over their base" in text and "| wrapped-sgd | tiny | sgd |" in text


def test_a_miss_met_by_the_fused_variant_says_so() -> None:
    slow = ss.Row("few-large", "prodigy", "prodigy", "tuneless", x_bound=5.0, bound_bytes=40)
    fast = ss.Row("few-large", "prodigy:fused=True", "prodigy", "tuneless", x_bound=1.5, bound_bytes=40)
    assert ss.check_targets([slow, fast]) == ["prodigy [few-large]: 5.00x its bound (40 B/param) > 4x (met with fused=True)"]
    fast.x_bound = 4.5  # both miss: no note
    assert ss.check_targets([slow, fast])[0].endswith("> 4x")
    # the note names the fused variant of the same settings only
    other = ss.Row("few-large", "prodigy:d0=1e-5", "prodigy", "tuneless", x_bound=5.0, bound_bytes=40)
    other_fused = ss.Row("few-large", "prodigy:d0=1e-5,fused=True", "prodigy", "tuneless", x_bound=1.5, bound_bytes=40)
    fast.x_bound = 1.5
    assert ss.check_targets([slow, fast, other]) == [
        "prodigy [few-large]: 5.00x its bound (40 B/param) > 4x (met with fused=True)",
        "prodigy:d0=1e-5 [few-large]: 5.00x its bound (40 B/param) > 4x"]
    assert ss.check_targets([other, other_fused])[0].endswith("(met with fused=True)")


@pytest.mark.parametrize("reuse_buffer", [False, True])
def test_mechanic_is_held_to_its_base_plus_two_passes(reuse_buffer) -> None:
    params = ss.make_params([(10, 10)], torch.device("cpu"))
    from tuneless import Mechanic
    opt = Mechanic(torch.optim.Adam(params, lr=1.0), reuse_buffer=reuse_buffer)
    passes = ss.MECHANIC_PASS_BYTES
    assert ss.bound_bytes("mechanic", opt)[0] == 28 + passes == 64
    limit = ss.MAX_X_BOUND * passes

    def row(overhead, x_bound):
        return ss.Row("few-large", "mechanic", "mechanic", "tuneless", x_bound=x_bound, bound_bytes=28 + passes,
                      base_label="adam", base_bound_bytes=28, overhead_bytes=overhead)

    # its own bound counts its base's at 1x, which torch's foreach Adam is far from: not the target
    assert ss.check_targets([row(limit - 1, 5.0)]) == []
    over_base = ss.check_targets([row(limit + 1, 3.9)])
    assert len(over_base) == 1 and f"> 4x its two passes' bound ({limit:g} B/param)" in over_base[0]
