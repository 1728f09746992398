"""bench/motion.py: how far the data moves gates that start at 1, plain SGD against AdamW, on a tiny BERT."""

from bench import common, motion


def test_motion_tool_measures_sgd_gates_moving_far_less_than_adamw_gates_and_reuses_finished_runs(
        glue_dir, tiny_model, tmp_path, monkeypatch):
    monkeypatch.setenv("SORALIB_CACHE", str(tmp_path / "cache"))
    out, runs = tmp_path / "motion.jsonl", tmp_path / "runs"
    argv = ["--task", "rte", "--epochs", "2", "--model", str(tiny_model), "--data-dir", str(glue_dir),
            "--runs-dir", str(runs), "--out", str(out)]
    assert motion.main(argv) == 0
    [record] = common.read_jsonl(out)
    sgd, adamw = record["updates"]["sgd"], record["updates"]["optimizer"]
    assert sgd["gates"] == adamw["gates"] > 0 and sgd["steps"] == adamw["steps"] > 0
    # AdamW moves a gate by about the lr each step whatever its gradient; SGD by lr × a gradient that starts at 0
    # (B = 0): were the gate update not passed on, both runs would be the same run
    assert 0 < adamw["max_abs"] <= 8e-4 * adamw["steps"] * 1.01
    assert sgd["max_abs"] < adamw["max_abs"] / 10
    stamps = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()}
    assert len(stamps) == 2
    assert motion.main(argv) == 0  # finished runs are measured again, not trained again
    assert {p.name: (p / "metrics.json").stat().st_mtime_ns for p in runs.iterdir() if p.is_dir()} == stamps
    assert len(common.read_jsonl(out)) == 2
    rows = "\n".join(motion.table([record]))
    assert "| rte | 0 | 2 | 0.0008 | lr | sgd |" in rows and "| optimizer |" in rows


def test_motion_tool_refuses_an_unknown_gate_update_before_training(tmp_path, capsys):
    import pytest

    with pytest.raises(SystemExit):
        motion.main(["--updates", "sgd,adam", "--runs-dir", str(tmp_path / "runs"), "--out", str(tmp_path / "m.jsonl")])
    assert "--updates must be a comma-separated subset of sgd, optimizer, got 'sgd,adam'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.jsonl").exists()
