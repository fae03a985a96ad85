"""`sparseprefill bench decode | layer` on the CPU (their dry runs) and the shared bench helpers."""

from __future__ import annotations

import csv
import dataclasses
import math

import pytest
import torch

from sparseprefill import cli
from sparseprefill.bench import common, decode, layer


def _csv_rows(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames), list(reader)


def test_decode_dry_run_writes_timing_accuracy_and_e2e_rows(tmp_path, capsys):
    assert cli.main(["bench", "decode", "--dry-run", "--out", str(tmp_path)]) == 0
    fields, timing = _csv_rows(tmp_path / "timing.csv")
    assert fields == decode.TIMING_FIELDS
    ops = {r["op"] for r in timing}
    assert {"summary_update", "score_select", "sparse_attn", "sparse_step", "dense_all_pages",
            "sparse_step_reuse1", "sparse_step_reuse4"} <= ops
    assert {(r["batch"], r["page"]) for r in timing} == {("1", "16"), ("1", "32"), ("2", "16"), ("2", "32")}
    assert all(float(r["ms"]) > 0 and r["gpu"] == "cpu-dry-run" for r in timing)
    fields, accuracy = _csv_rows(tmp_path / "accuracy.csv")
    assert fields == decode.ACCURACY_FIELDS and len(accuracy) == 2 * len(decode.VARIANTS)
    assert all(0.0 <= float(r["recall_mean"]) <= 1.0 + 1e-6 for r in accuracy)
    fields, e2e = _csv_rows(tmp_path / "e2e.csv")
    assert fields == decode.E2E_FIELDS
    assert [r["variant"] for r in e2e] == ["dense", "topk_r1", "topk_r4"]  # whole-model decode ran
    assert all(0.0 < float(r["decode_density"]) < 1.0 for r in e2e[1:])
    assert "e2e variant" in capsys.readouterr().out


def test_layer_dry_run_profiles_every_op(tmp_path, capsys):
    assert cli.main(["bench", "layer", "--dry-run", "--rows", "4", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    fields, rows = _csv_rows(tmp_path / "layer.csv")
    assert fields == layer.CSV_FIELDS
    expected = ["estimate", "attend", "estimate_lines", "run", "sdpa", "top_k_pages", "page_scores", "select_pages"]
    assert [r["op"] for r in rows] == expected
    assert all(r["length"] == str(layer.DRY_RUN_LENGTHS[0]) and float(r["median_ms"]) > 0 for r in rows)
    assert printed.count("=====") == len(expected) and "predicted density" in printed


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
@pytest.mark.parametrize("target", ["decode", "follow-up", "layer"])
def test_gpu_benchmarks_without_gpu_say_so(target, capsys):
    assert cli.main(["bench", target]) == 1
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_bench_parser_keeps_the_script_flags_and_defaults():
    parser = cli.build_parser()
    args = parser.parse_args(["bench", "decode"])
    assert (args.contexts, args.batches, args.pages, args.budget, args.reselect) == ([32768, 131072], [1, 8],
                                                                                     [16, 32, 64], 2048, [1, 4])
    assert (args.csv, args.e2e_context, args.e2e_steps, args.e2e) == ("bench_topk_decode.csv", 32768, 24, False)
    args = parser.parse_args(["bench", "decode", "--contexts", "32768", "131072", "--batches", "1", "8", "--pages",
                              "16", "--budget", "2048", "--reselect", "1", "4", "--e2e"])
    assert args.e2e and args.reselect == [1, 4]
    args = parser.parse_args(["bench", "follow-up"])
    assert (args.contexts, args.chunks, args.budget, args.dry_run, args.out) == ([32768, 131072], [64, 256], 2048,
                                                                                 False, None)
    args = parser.parse_args(["bench", "layer", "--lengths", "32768", "131072"])
    assert (args.lengths, args.density, args.rows, args.no_decode) == ([32768, 131072], 0.1, 18, False)


def test_write_csv_rows_dicts_and_dataclasses(tmp_path):
    @dataclasses.dataclass
    class Row:
        name: str
        ms: float

    path = common.write_csv(tmp_path / "sub" / "a.csv", ["name", "ms"], [Row("x", 1 / 3), Row("y", math.nan)],
                            compact_floats=True)
    assert path.read_text().splitlines() == ["name,ms", "x,0.333333", "y,"]
    common.append_csv(tmp_path / "b.csv", ["name", "ms"], [dict(name="x", ms=0.5)])
    common.append_csv(tmp_path / "b.csv", ["name", "ms"], [dict(name="y", ms=0.25)])
    common.append_csv(tmp_path / "b.csv", ["name", "ms"], [])
    assert (tmp_path / "b.csv").read_text().splitlines() == ["name,ms", "x,0.5", "y,0.25"]


def test_commit_honours_environment(monkeypatch):
    monkeypatch.setenv("SPARSEPREFILL_COMMIT", "abc1234")
    assert common.git_commit() == "abc1234"
    assert common.environment(torch.device("cpu"))["commit"] == "abc1234"


def test_commit_is_marked_dirty_when_tracked_files_changed(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("needs git")
    monkeypatch.delenv("SPARSEPREFILL_COMMIT", raising=False)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(tmp_path)]
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(git + ["add", "a.py"], check=True)
    subprocess.run(git + ["commit", "-q", "-m", "one"], check=True)
    head = subprocess.check_output(git + ["rev-parse", "--short", "HEAD"], text=True).strip()
    (tmp_path / "untracked.txt").write_text("ignored\n")
    assert common.git_commit(tmp_path) == head
    (tmp_path / "a.py").write_text("x = 2\n")
    assert common.git_commit(tmp_path) == f"{head}-dirty"


def test_cpu_timing_helpers():
    calls = []
    assert common.bench_ms(lambda: calls.append(1), "cpu") >= 0 and len(calls) == 1 + common.CPU_TIMED_CALLS
    times = common.time_ms(lambda: None, torch.device("cpu"), warmup=1, repeats=3)
    assert len(times) == 3 and all(t >= 0 for t in times)
