"""Plots: what smoothing did (``quantize --plot``, ``plots.plot_smoothing``) and the per-layer SQNR
(``eval --plot``, ``plots.plot_layer_sqnr``). The pictures are checked for being real images; the numbers
behind them are checked against the smoothing they describe."""
import sys

import pytest
import torch

import sq_kernels as sq
from sq_kernels import plots
from sq_kernels.cli import main
from sq_kernels.evaluation import layer_sqnr

from conftest import calib_tokens, make_model

pytest.importorskip("matplotlib", reason="the plots need matplotlib (pip install matplotlib)")
pytestmark = pytest.mark.usefixtures("one_thread")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path, min_bytes=10_000):
    data = path.read_bytes()
    return data[:8] == PNG_MAGIC and len(data) >= min_bytes


def test_report_vectors_describe_the_smoothing_that_was_done():
    model = make_model("llama")
    stats = sq.collect_act_stats(model, calib_tokens(), progress=False)
    report = sq.smooth_(model, stats, sq.SmoothQuantConfig(alpha=0.8, progress=False))
    assert len(report.vectors) == len(report.groups) == 2 * model.config.num_hidden_layers
    v = report.vectors["model.layers.0.input_layernorm"]
    assert v["targets"] == [f"model.layers.0.self_attn.{t}_proj" for t in "qkv"]
    # the activation after smoothing is what the report's statistics say the linears now see
    torch.testing.assert_close(v["act"] / v["scale"], report.stats["model.layers.0.self_attn.q_proj"])
    torch.testing.assert_close(v["scale"], sq.smooth.smoothing_scale(v["act"], v["weight"], 0.8))
    # the planted outlier channels are what smoothing removes: the activation's worst channel comes much closer
    # to a typical one, and the weight takes some of it
    for name, v in report.vectors.items():
        before, after = plots._outlier_ratio(v["act"]), plots._outlier_ratio(v["act"] / v["scale"])
        assert after < before / 3, (name, before, after)
    assert "vectors" not in report.to_dict()


def test_plot_functions_write_images_and_refuse_bad_arguments(tmp_path):
    model = make_model("llama")
    stats = sq.collect_act_stats(model, calib_tokens(), progress=False)
    fp = make_model("llama")
    report = sq.smooth_(model, stats, sq.SmoothQuantConfig(progress=False))
    assert _is_png(plots.plot_smoothing(report, tmp_path / "s.png"))
    assert _is_png(plots.plot_smoothing(report, tmp_path / "one.png", groups=["model.layers.1.post_attention_layernorm"]))
    with pytest.raises(ValueError, match="unknown groups.*model.layers.9.x"):
        plots.plot_smoothing(report, tmp_path / "x.png", groups=["model.layers.9.x"])
    with pytest.raises(ValueError, match=r"must end in one of \.png, \.pdf, \.svg"):
        plots.plot_smoothing(report, tmp_path / "s.jpeg")
    with pytest.raises(ValueError, match="folder .* does not exist"):
        plots.plot_smoothing(report, tmp_path / "nope" / "s.png")
    read_back = sq.smooth.SmoothReport(report.family, report.alphas, report.groups)
    with pytest.raises(ValueError, match="no smoothing vectors"):
        plots.plot_smoothing(read_back, tmp_path / "x.png")

    sq.quantize_(model, sq.SmoothQuantConfig(progress=False))
    naive = make_model("llama")
    sq.quantize_(naive, sq.SmoothQuantConfig(progress=False, activation="per_tensor"))
    x = calib_tokens(2, 32, seed=5)
    smooth_db = layer_sqnr(fp, model, x, progress=False)
    naive_db = layer_sqnr(fp, naive, x, progress=False)
    assert _is_png(plots.plot_layer_sqnr(smooth_db, tmp_path / "one.png"))
    out = plots.plot_layer_sqnr({"SmoothQuant": smooth_db, "naive": naive_db}, tmp_path / "two.svg")
    assert out.read_text(encoding="utf-8").lstrip().startswith("<?xml") and "naive" in out.read_text(encoding="utf-8")
    with pytest.raises(ValueError, match="non-empty dict"):
        plots.plot_layer_sqnr({}, tmp_path / "e.png")
    with pytest.raises(ValueError, match="non-numbers for"):
        plots.plot_layer_sqnr({"a": {"q": "high"}}, tmp_path / "e.png")


def test_plot_layer_and_kind_parse_module_names():
    assert plots._layer_and_kind("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    assert plots._layer_and_kind("model.language_model.layers.3.mlp.experts") == (3, "mlp.experts")
    assert plots._layer_and_kind("lm_head") == (None, "lm_head")


def test_cli_quantize_and_eval_plots(model_dir, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    smoothing_png = tmp_path / "smoothing.png"
    rc = main(["quantize", str(model_dir), str(out), "--data", str(text_file), "--num-samples", "4", "--seq-len",
               "64", "--no-progress", "--plot", str(smoothing_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert f"plotted the smoothing to {smoothing_png}" in printed and _is_png(smoothing_png)
    sqnr_png = tmp_path / "sqnr.png"
    rc = main(["eval", str(out), "--reference", str(model_dir), "--sqnr-data", str(text_file), "--seq-len", "64",
               "--no-progress", "--plot", str(sqnr_png)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "plotted the per-layer SQNR" in printed and _is_png(sqnr_png)

    # an existing plot is the user's file: refused before any work, unchanged, unless --overwrite
    before = sqnr_png.read_bytes()
    rc = main(["eval", str(out), "--reference", str(model_dir), "--sqnr-data", str(text_file), "--seq-len", "64",
               "--no-progress", "--plot", str(sqnr_png)])
    assert rc == 2 and "--plot" in capsys.readouterr().err and sqnr_png.read_bytes() == before
    rc = main(["eval", str(out), "--reference", str(model_dir), "--sqnr-data", str(text_file), "--seq-len", "64",
               "--no-progress", "--plot", str(sqnr_png), "--overwrite"])
    assert rc == 0 and _is_png(sqnr_png)


@pytest.mark.parametrize("extra,message", [
    (["--plot", "s.jpeg"], r"--plot .*s\.jpeg: the file name must end in one of \.png"),
    (["--plot", "s.png", "--no-smooth"], "--no-smooth smooths nothing"),
    (["--plot", "missing/s.png"], "--plot missing/s.png: the directory .* does not exist"),
])
def test_cli_quantize_plot_errors_come_before_any_work(model_dir, text_file, tmp_path, monkeypatch, capsys, extra,
                                                       message):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "q"
    rc = main(["quantize", str(model_dir), str(out), "--data", str(text_file), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and __import__("re").search(message, err), err
    assert not out.exists()


def test_cli_eval_plot_needs_the_sqnr_report_and_matplotlib(model_dir, text_file, tmp_path, monkeypatch, capsys):
    rc = main(["eval", str(model_dir), "--ppl", str(text_file), "--plot", str(tmp_path / "p.png")])
    assert rc == 2 and "pass --reference DIR and --sqnr-data FILE" in capsys.readouterr().err
    for name in ("matplotlib", "matplotlib.figure"):  # as if it were not installed
        monkeypatch.setitem(sys.modules, name, None)
    rc = main(["eval", str(model_dir), "--reference", str(model_dir), "--sqnr-data", str(text_file),
               "--plot", str(tmp_path / "p.png")])
    assert rc == 2 and "needs matplotlib, which is not installed: pip install matplotlib" in capsys.readouterr().err
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plots.plot_layer_sqnr({"logits": 30.0}, tmp_path / "p.png")
