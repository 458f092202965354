"""Evaluation and the alpha search under conditions a user creates without meaning to: a model left in
training mode (dropout), a submodule frozen in eval mode inside it, a huge text file read for a few windows,
a padded batch, blank texts, a model so broken that exp(NLL) overflows, a last word after a newline,
alpha grids whose values print alike."""
import copy
import json
import math
import warnings

import pytest
import torch

import sq_kernels as sq
from sq_kernels.calibration import collect_act_stats
from sq_kernels.cli import main
from sq_kernels.evaluation import _context_and_target, last_token_accuracy, layer_sqnr, perplexity

from conftest import TEXT, calib_tokens, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _modes(model):
    return {name: m.training for name, m in model.named_modules()}


def _train_with_a_frozen_layer(model):
    """Training mode, except one decoder layer the user froze in eval mode."""
    model.train()
    model.model.decoder.layers[0].eval()
    return _modes(model)


# ----------------------------------------------------------------------------------------------
# Eval mode, and each module's own mode given back
# ----------------------------------------------------------------------------------------------
def test_perplexity_and_accuracy_run_without_dropout_and_restore_every_modules_mode(tokenizer):
    model = make_model("opt", outliers=False)
    assert model.config.dropout > 0  # dropout would change every result in training mode
    ids = calib_tokens(1, 120, seed=3)[0]
    expected = perplexity(model, ids, seq_len=64, progress=False)
    texts = [s.strip() for s in TEXT.split(".")[:4] if s.strip()]
    expected_acc = last_token_accuracy(model, texts, tokenizer, progress=False)
    modes = _train_with_a_frozen_layer(model)
    assert [perplexity(model, ids, seq_len=64, progress=False) for _ in range(2)] == [expected, expected]
    assert _modes(model) == modes
    assert last_token_accuracy(model, texts, tokenizer, progress=False) == expected_acc
    assert _modes(model) == modes


def test_layer_sqnr_runs_both_models_without_dropout():
    fp = make_model("opt", outliers=False)
    q = copy.deepcopy(fp)
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    data = calib_tokens(2, 32)
    expected = layer_sqnr(fp, q, data, num_samples=2, seq_len=32, progress=False)
    fp_modes, q_modes = _train_with_a_frozen_layer(fp), _train_with_a_frozen_layer(q)
    assert layer_sqnr(fp, q, data, num_samples=2, seq_len=32, progress=False) == expected
    assert _modes(fp) == fp_modes and _modes(q) == q_modes


def test_calibration_and_alpha_search_give_back_each_modules_mode():
    model = make_model("opt")
    data = calib_tokens(4, 24)
    stats = collect_act_stats(model, data, progress=False)
    modes = _train_with_a_frozen_layer(model)
    again = collect_act_stats(model, data, progress=False)
    assert _modes(model) == modes
    assert all(torch.equal(again.absmax[n], stats.absmax[n]) for n in stats.absmax)  # no dropout while observing
    sq.smooth_(model, stats, sq.SmoothQuantConfig(progress=False, alpha="auto", alpha_grid=(0.5, 0.8),
                                                  alpha_search_batches=2), data=data)
    assert _modes(model) == modes


# ----------------------------------------------------------------------------------------------
# What perplexity reads
# ----------------------------------------------------------------------------------------------
def test_perplexity_with_max_windows_reads_only_the_start_of_a_text_file(tokenizer, tmp_path):
    # 2 MB of text, then bytes that are not UTF-8: read whole, the file is an error; the first windows
    # only need its start, so they are scored without reaching the bad bytes, exactly as on that start.
    model = make_model("llama")
    head = TEXT * (2_000_000 // len(TEXT))
    path = tmp_path / "big.txt"
    path.write_bytes(head.encode() + b"\xff\xfe not utf-8")
    with pytest.raises(ValueError, match="UTF-8"):
        perplexity(model, path, tokenizer, seq_len=64, progress=False)
    got = perplexity(model, path, tokenizer, seq_len=64, max_windows=3, progress=False)
    start = tmp_path / "start.txt"
    start.write_text(TEXT * 2, encoding="utf-8")
    assert got == perplexity(model, start, tokenizer, seq_len=64, max_windows=3, progress=False)


def test_a_padded_batch_is_refused_and_one_row_is_a_stream():
    model = make_model("llama")
    ids = calib_tokens(1, 48, seed=2)
    assert perplexity(model, ids, seq_len=16, progress=False) == perplexity(model, ids[0], seq_len=16,
                                                                            progress=False)
    padded = torch.cat([ids, torch.zeros(1, 48, dtype=ids.dtype)])
    with pytest.raises(ValueError, match=r"1-D tensor.*\(2, 48\).*padding"):
        perplexity(model, padded, seq_len=16, progress=False)


def test_blank_texts_are_left_out_and_no_text_at_all_is_an_error(tokenizer, tmp_path):
    model = make_model("llama")
    texts = [TEXT[:200], TEXT[200:400]]
    expected = perplexity(model, texts, tokenizer, seq_len=32, progress=False)
    with_blanks = ["", texts[0], "  \n", texts[1], ""]
    assert perplexity(model, with_blanks, tokenizer, seq_len=32, progress=False) == expected
    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in with_blanks), encoding="utf-8")
    assert perplexity(model, jsonl, tokenizer, seq_len=32, progress=False) == expected
    blank_txt, blank_jsonl = tmp_path / "blank.txt", tmp_path / "blank.jsonl"
    blank_txt.write_text("\n\n   \n" * 20, encoding="utf-8")
    blank_jsonl.write_text('{"text": ""}\n{"text": "  "}\n', encoding="utf-8")
    for data in (blank_txt, blank_jsonl, ["", " \t"]):
        with pytest.raises(ValueError, match="holds no text"):
            perplexity(model, data, tokenizer, seq_len=32, progress=False)
    with pytest.raises(ValueError, match="holds no text"):  # the piecewise reader too
        perplexity(model, blank_txt, tokenizer, seq_len=32, max_windows=1, progress=False)


def test_a_perplexity_beyond_float_range_is_inf_with_a_warning():
    model = make_model("llama")
    with torch.no_grad():
        model.lm_head.weight.mul_(1e4)  # exploding logits: a mean NLL of thousands of nats
    with pytest.warns(UserWarning, match="overflows a float, reported as inf"):
        assert perplexity(model, calib_tokens(1, 64)[0], seq_len=32, progress=False) == math.inf


# ----------------------------------------------------------------------------------------------
# The last word
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,context,word", [
    ("he opened the door and said\nhello", "he opened the door and said", "\nhello"),
    ("name:\n\nAlice", "name:\n", "\nAlice"),
    ("a b  c", "a b ", " c"),
])
def test_the_last_word_follows_the_last_whitespace_of_any_kind(tokenizer, text, context, word):
    ctx, target = _context_and_target(tokenizer, text, 0)
    assert tokenizer.decode(ctx.tolist(), skip_special_tokens=True) == context
    assert tokenizer.decode(target.tolist()) == word  # a character tokenizer: the separator is the target's start


# ----------------------------------------------------------------------------------------------
# The alpha search's candidates
# ----------------------------------------------------------------------------------------------
def test_the_alpha_search_applies_the_grid_values_themselves():
    model = make_model("llama")
    data = calib_tokens(4, 24)
    stats = collect_act_stats(model, data, progress=False)
    grid = (0.123456789, 0.5, 0.50000001, 0.987654321, 0.5)
    report = sq.smooth_(copy.deepcopy(model), stats, sq.SmoothQuantConfig(
        progress=False, alpha="auto", alpha_grid=grid, alpha_search_batches=2), data=data)
    assert set(report.alphas.values()) <= set(grid)
    for layer, losses in report.search.items():
        assert list(losses) == ["0.123456789", "0.5", "0.50000001", "0.987654321"]  # distinct keys, tried once
        best = min(losses.values())
        assert losses[next(k for k in losses if float(k) == report.alphas[layer])] == best


# ----------------------------------------------------------------------------------------------
# The per-layer SQNR's data
# ----------------------------------------------------------------------------------------------
def test_little_sqnr_data_warns_about_the_sqnr_not_calibration(tmp_path):
    fp = make_model("llama")
    q = copy.deepcopy(fp)
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    stream = calib_tokens(1, 40)[0]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer_sqnr(fp, q, stream, num_samples=4, seq_len=32, progress=False)
    messages = [str(w.message) for w in caught]
    assert any("SQNR" in m and "--sqnr-samples" in m for m in messages), messages
    assert not any("calibration" in m or "activation outliers" in m for m in messages), messages


def test_cli_eval_takes_sqnr_samples(model_dir, tmp_path, capsys, text_file):
    q_dir = tmp_path / "q"
    assert main(["quantize", str(model_dir), str(q_dir), "--data", str(text_file), "--num-samples", "2",
                 "--seq-len", "32", "--no-progress"]) == 0
    assert main(["eval", str(q_dir), "--reference", str(model_dir), "--sqnr-data", str(text_file),
                 "--sqnr-samples", "0", "--seq-len", "32", "--no-progress"]) == 2
    assert "--sqnr-samples" in capsys.readouterr().err
    out = tmp_path / "r.json"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["eval", str(q_dir), "--reference", str(model_dir), "--sqnr-data", str(text_file),
                     "--sqnr-samples", "64", "--seq-len", "32", "--no-progress", "--json", str(out)]) == 0
    assert any("num_samples=64" in str(w.message) for w in caught)  # the file holds fewer: the count was used
    assert "logits" in json.loads(out.read_text())["layer_sqnr_db"]
