"""`streamdiff bench --stages`: real stages per stage count, one thread each, through the CLI
(table + JSON with the documented keys), and its flag errors; model mode on a config that serves
on threaded stages also measures them (`served`)."""

from __future__ import annotations

import json

import pytest

from streamdiff.cli import main


def test_stages_bench_runs_real_stages_and_writes_the_documented_json(tmp_path, capsys):
    out = tmp_path / "stages.json"
    rc = main(["bench", "--config", "tiny", "--set", "model.num_layers=2", "--set", "runtime.device=cpu",
               "--resolution", "32x32", "--steps", "2", "--stages", "1,2", "--duration", "0.5", "-q",
               "--json", str(out)])
    assert rc == 0
    table = capsys.readouterr().out
    assert "stage busy %" in table and "speed-up" in table
    report = json.loads(out.read_text())
    assert report["mode"] == "stages" and report["transport"] == "threads" and not report["interrupted"]
    assert report["device"].startswith("CPU "), report["device"]  # a probe: "auto", the config's word
    one, two = report["results"]
    for r, stages in ((one, 1), (two, 2)):
        assert {"stages", "fps", "latency_p50_ms", "latency_p99_ms"} <= set(r)
        assert r["stages"] == stages and r["partition"] == ([2] if stages == 1 else [1, 1])
        # the automatic lane stride is the stage count, and the pipeline really held that many plans
        assert r["lane_stride"] == stages and r["plans_in_flight"] == stages
        assert len(r["stage_busy"]) == stages and all(0.0 < b <= 1.05 for b in r["stage_busy"])
        assert r["output_frames"] > 0 and r["latency_p50_ms"] <= r["latency_p99_ms"]
    assert one["speedup"] == 1.0 and two["speedup"] == pytest.approx(two["fps"] / one["fps"])


def test_ctrl_c_reports_the_stage_counts_already_measured(tmp_path, capsys, monkeypatch):
    """A probe: Ctrl-C (or SIGTERM) in the second stage count printed only "interrupted": the
    first one's numbers, minutes of Ray start-up and measuring, were lost."""
    import streamdiff.bench.stages as stages

    real, calls = stages.run_stage_combination, []

    def second_interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "run_stage_combination", second_interrupted)
    out = tmp_path / "stages.json"
    rc = main(["bench", "--config", "tiny", "--set", "model.num_layers=2", "--set", "runtime.device=cpu",
               "--resolution", "32x32", "--steps", "1", "--stages", "1,2", "--duration", "0.3", "-q",
               "--json", str(out)])
    assert rc == 130
    report = json.loads(out.read_text())
    assert report["interrupted"] and len(report["results"]) == 1 and report["combinations"] == 2
    captured = capsys.readouterr()
    assert "1 of 2 combinations measured" in captured.err and "stage busy %" in captured.out


def test_model_mode_also_measures_the_threaded_stages_a_config_serves_on(tmp_path, capsys):
    small = ["--config", "tiny", "--set", "model.num_layers=2", "--set", "runtime.device=cpu", "--resolution", "32x32",
             "--steps", "1", "--duration", "0.5", "-q"]
    threads = ["--set", "parallel.backend=threads", "--set", "parallel.vae_stages=true", "--set", "parallel.lane_stride=2"]
    out = tmp_path / "served.json"
    assert main(["bench", *small, *threads, "--json", str(out)]) == 0
    text = capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["mode"] == "model" and len(report["results"]) == 1  # the one-process step, as before
    served = report["served"]
    assert served["mode"] == "stages" and served["transport"] == "threads"
    (row,) = served["results"]
    # the layout serve builds: encode, the DiT's 2 blocks, decode; two chunks in flight
    assert row["stages"] == 1 and row["partition"] == [2] and len(row["stage_busy"]) == 3
    assert row["lane_stride"] == 2 and row["plans_in_flight"] == 2
    assert row["output_frames"] > 0 and all(0.0 < b <= 1.05 for b in row["stage_busy"])
    assert "as served" in text and "speed-up" not in text

    # a config that serves on one thread gets the one-process table only
    plain = tmp_path / "plain.json"
    assert main(["bench", *small, "--json", str(plain)]) == 0
    assert "served" not in json.loads(plain.read_text()) and "as served" not in capsys.readouterr().out


@pytest.mark.parametrize("args, words", [
    (["--ray"], "--ray needs --stages"),
    (["--stages", "1,2", "--compile"], "--stages runs eager stages"),
    (["--stages", "1,3", "--set", "model.num_layers=2"], "the model has only 2 blocks"),
])
def test_stages_bench_flag_errors(args, words, capsys):
    assert main(["bench", "--config", "tiny", "--duration", "0.1", *args]) == 2
    assert words in capsys.readouterr().err
