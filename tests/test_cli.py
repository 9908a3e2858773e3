import json

from typer.testing import CliRunner

from koala_flows.cli import app

runner = CliRunner()


def test_prompts_sharegpt_reports_recovered():
    r = runner.invoke(app, ["prompts", "--source", "sharegpt", "--limit", "3"])
    assert r.exit_code == 0, r.output
    assert r.output.count("sharegpt/sharegpt") == 3
    assert "recovered 17671 complete conversations" in r.output


def test_prompts_json():
    r = runner.invoke(app, ["prompts", "--source", "mtbench", "--limit", "2", "--json"])
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert len(lines) == 2 and lines[0]["category"] == "writing"


def test_bad_source_is_one_line_and_nonzero(tmp_path):
    r = runner.invoke(app, ["prompts", "--source", str(tmp_path / "none.jsonl")])
    assert r.exit_code == 1
    assert r.output.strip().startswith("error:") and len(r.output.strip().splitlines()) == 1


def test_generate_streams_a_real_answer(default_target):
    r = runner.invoke(app, ["generate", "What is the capital of France?", "--max-new-tokens", "12"])
    assert r.exit_code == 0, r.output
    assert "Paris" in r.output and "tokens/s" in r.output
