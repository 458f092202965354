"""The benchmarks' planning and reporting code, on CPU.

Timing needs a GPU, but everything after it (tables, target lines, markdown, plots) runs on the
rows of the result files kept in benchmarks/results/. A report that crashes after the timings are
taken would waste a GPU session, so it is checked here, on real rows from the last GPU run.
"""
from __future__ import annotations

import copy
import importlib
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
RESULTS = BENCH / "results"


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, str(BENCH))
    try:
        yield lambda name: importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))


def stored(stem):
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: the latest results are meant to be kept in the repo")
    return json.loads(path.read_text())


@pytest.mark.parametrize("flags,mode,suffix", [([], "eager", ""), (["--graph"], "graph", "_graph"),
                                               (["--back-to-back"], "b2b", "_b2b")])
def test_gemm_timing_modes(bench, flags, mode, suffix):
    g = bench("bench_gemm")
    args = g.parse_args(flags)
    assert g.timing_mode(args) == mode
    assert args.graph == (mode != "eager")  # back to back is a graph mode
    assert mode in g.TIMING_TITLE and mode in g.TIMING_NOTE


def test_norm_quant_timing_flags(bench):
    nq = bench("bench_norm_quant")
    assert nq.parse_args(["--back-to-back"]).back_to_back
    with pytest.raises(SystemExit):
        nq.parse_args(["--eager", "--back-to-back"])


def test_gemm_plan_filters_and_rejects(bench):
    g = bench("bench_gemm")
    pts = g.plan(g.parse_args(["--models", "Llama-2-7B", "--shapes", "qkv", "--m", "1,16"]))
    assert pts == [("Llama-2-7B", "qkv", 12288, 4096, [1, 16])]
    with pytest.raises(SystemExit, match="unknown model"):
        g.plan(g.parse_args(["--models", "GPT-5"]))
    with pytest.raises(SystemExit, match="positive"):
        g.plan(g.parse_args(["--m", "0"]))


@pytest.mark.parametrize("mode", ["graph", "b2b"])
def test_gemm_report_from_stored_rows(bench, tmp_path, mode):
    g = bench("bench_gemm")
    data = stored("gemm")
    meta = dict(data["meta"], timing=mode)
    rows = data["rows"]
    g.write_markdown(tmp_path / "g.md", rows, meta, ["a note"])
    text = (tmp_path / "g.md").read_text()
    assert g.TIMING_TITLE[mode] in text.splitlines()[0] and g.TIMING_NOTE[mode] in text
    assert "- a note" in text
    target = g.targets(rows)
    assert len(target) >= 4 and all(("MET" in t) or ("MISSED" in t) for t in target[:4])
    # the M <= 16 line recomputes what the stored rows say
    small = [r["ours_fp16_x_fp16"] for r in rows if r["M"] <= 16 and r["ours_fp16_x_fp16"] != ""]
    assert f"{g.geomean(small):.2f}x" in " ".join(target)
    png = g.plot(tmp_path / "g.png", rows)
    assert png.startswith("no plot") or (tmp_path / "g.png").stat().st_size > 1000


def test_gemm_finish_row_fills_every_column(bench):
    g = bench("bench_gemm")
    row = g.finish_row({"model": "m", "layer": "l", "N": 16, "K": 32, "M": 1, "fp16_us": 10.0, "bf16_us": 12.0,
                        "ours_fp16_us": 5.0, "ours_bf16_us": 4.0}, 1, 16, 32)
    assert row["ours_fp16_x_fp16"] == 2.0 and row["ours_bf16_x_bf16"] == 3.0
    assert row["bnb_int8_us"] == "" and row["bnb_int8_x_fp16"] == ""  # absent peers: empty cells, same columns


@pytest.mark.parametrize("b2b", [False, True], ids=["graph", "b2b"])
def test_norm_quant_report_from_stored_rows(bench, tmp_path, b2b):
    nq = bench("bench_norm_quant")
    data = stored("norm_quant_quick")
    nq.write_markdown(tmp_path / "n.md", data["rows"], dict(data["meta"], back_to_back=b2b))
    text = (tmp_path / "n.md").read_text()
    assert nq.TIMING["b2b" if b2b else "graph"] in text
    lines = nq.target_lines(data["rows"])
    assert lines and all(line in text for line in lines)
    assert all(("MET" in line) or ("MISSED" in line) for line in lines)


def test_attention_targets_say_where_the_memory_cap_rules_out_the_target(bench, tmp_path):
    att = bench("bench_attention")
    data = stored("attention_quick_bmm")
    rows = copy.deepcopy(data["rows"])
    for r in rows:  # rows from before the bytes columns existed get them (a cap below the target on qk)
        r.setdefault("fp16_GBs", 2500.0)
        r.setdefault("int8_GBs", 1800.0)
        r.setdefault("mem_cap_x", 1.1 if r["op"] == "qk" else 1.9)
    full = stored("attention_quick_full")["rows"]
    lines = att.targets(rows, full)
    qk = [r for r in rows if r["op"] == "qk" and r["phase"] == "prefill" and r["M"] >= 1024]
    if any(r["int8_x_fp16"] < att.BMM_TARGET for r in qk):
        assert any("out of reach" in line for line in lines)
    meta = dict(data["meta"], copy_GBs=2400.0)
    att.write_markdown(tmp_path / "a.md", rows, full, meta, ["n1"])
    text = (tmp_path / "a.md").read_text()
    assert all(line in text for line in lines) and "- n1" in text


@pytest.mark.parametrize("stem", ["quantize_memory_cpu_llama-2-7b_8L", "quantize_memory_cpu_llama-2-7b_32L"])
def test_quantize_memory_report_from_stored_rows(bench, stem):
    qm = bench("bench_quantize_memory")
    data = stored(stem)
    text = qm.markdown(data["rows"], data["meta"])
    assert text == (RESULTS / f"{stem}.md").read_text()  # the stored report is the one these rows give
    by = {r["mode"]: r for r in data["rows"]}
    assert by["stream"]["extra_peak_gib"] < 0.2 * by["stream"]["w8a8_gib"]  # one module, not the int8 copy
    if "atomic" in by:
        assert by["atomic"]["extra_peak_gib"] > 3 * by["stream"]["extra_peak_gib"]


def test_quantize_memory_plan_and_bad_arguments(bench, capsys):
    qm = bench("bench_quantize_memory")
    assert qm.main(["--arch", "llama-2-7b", "--layers", "2", "--list"]) == 0
    assert "llama-2-7b: 2 layers, fp16, on cpu; modes stream, atomic" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        qm.main(["--modes", "fast"])
    assert "--modes: expected a comma-separated subset" in capsys.readouterr().err
