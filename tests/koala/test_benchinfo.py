"""The resumable benches' run log (koala.benchinfo.RunLog)."""

from koala.benchinfo import RunLog


def test_a_run_log_resumes_its_settings_runs_and_survives_a_line_cut_short(tmp_path, capsys):
    log = RunLog(tmp_path, {"profile": "smoke", "steps": 100}, key=lambda r: (r["seed"],))
    log.add({"seed": 0, "agreement": 0.3})
    path = tmp_path / "runs.jsonl"
    path.write_text(path.read_text() + '{"profile": "smoke", "steps": 100, "seed": 1, "agr')  # killed mid-write

    again = RunLog(tmp_path, {"profile": "smoke", "steps": 100}, key=lambda r: (r["seed"],))
    assert set(again.done) == {(0,)} and again.done[(0,)]["agreement"] == 0.3  # the cut line is skipped
    again.add({"seed": 1, "agreement": 0.4})  # written on a line of its own after the cut one
    assert set(RunLog(tmp_path, {"profile": "smoke", "steps": 100}, key=lambda r: (r["seed"],)).done) == {(0,), (1,)}
    assert RunLog(tmp_path, {"profile": "smoke", "steps": 300}, key=lambda r: (r["seed"],)).done == {}  # other settings
    assert '"seed": 1' in capsys.readouterr().out  # each finished run is printed
