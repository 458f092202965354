"""Evaluation: SQNR, sliding-window perplexity (against an independent per-token computation), last-word
accuracy with known answers, and the per-layer SQNR report, FP against quantized."""
import copy
import json
import math

import pytest
import torch
from torch import nn

import sq_kernels as sq
from sq_kernels.evaluation import format_sqnr_table, last_token_accuracy, layer_sqnr, perplexity, sqnr

from conftest import TEXT, VOCAB, calib_tokens, make_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_sqnr_values():
    ref = torch.randn(1000, dtype=torch.float64)
    assert sqnr(ref, ref.clone()) == math.inf
    assert sqnr(ref, ref * 0.9) == pytest.approx(20.0, abs=1e-9)   # error = 10 % of the norm
    assert sqnr(ref, ref * 0.99) == pytest.approx(40.0, abs=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        sqnr(ref, ref[:10])


@pytest.mark.parametrize("seq_len,stride", [(16, 16), (16, 8)])
def test_perplexity_matches_per_token_computation(seq_len, stride):
    model = make_model("llama")
    ids = calib_tokens(1, 40, seed=9)[0]
    # which window scores which token, written out independently of the implementation
    owner, scored_to, begin = {}, 1, 0
    while begin < ids.numel() - 1:
        end = min(begin + seq_len, ids.numel())
        for p in range(max(scored_to, begin + 1), end):
            owner[p] = begin
        scored_to = max(scored_to, end)
        if end == ids.numel():
            break
        begin += stride
    unscored = sorted(set(range(1, 40)) - set(owner))
    assert unscored == ([16, 32] if stride == seq_len else [])  # disjoint windows: window starts are context only
    nll = 0.0
    for p, b in owner.items():
        with torch.no_grad():
            logits = model(input_ids=ids[b:p][None], use_cache=False).logits[0, -1].double()
        nll -= float(torch.log_softmax(logits, -1)[ids[p]])
    expected = math.exp(nll / len(owner))
    assert perplexity(model, ids, seq_len=seq_len, stride=stride, progress=False) == pytest.approx(expected, rel=1e-4)


def test_uniform_model_has_vocab_perplexity(tokenizer, text_file):
    model = make_model("opt", outliers=False)
    with torch.no_grad():
        model.lm_head.weight.zero_()  # tied to the embeddings: zero logits everywhere
    assert perplexity(model, text_file, tokenizer, seq_len=64, progress=False) == pytest.approx(VOCAB, rel=1e-5)


def test_perplexity_errors(tokenizer, tmp_path):
    model = make_model("llama")
    with pytest.raises(ValueError, match="stride"):
        perplexity(model, torch.arange(10), seq_len=8, stride=9)
    with pytest.raises(ValueError, match="is not a file"):
        perplexity(model, tmp_path / "missing.txt", tokenizer)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, torch.tensor([5]))


class _Oracle(nn.Module):
    """A fake causal LM whose greedy next token is ``answer(ids)`` (for accuracy tests with known results)."""

    def __init__(self, answer):
        super().__init__()
        self.answer = answer
        self.dummy = nn.Parameter(torch.zeros(1))
        self.config = type("Config", (), {"vocab_size": VOCAB})()

    def forward(self, input_ids, use_cache=False):
        nxt = self.answer(input_ids[0])
        logits = torch.zeros(1, input_ids.shape[1], VOCAB)
        logits[0, torch.arange(input_ids.shape[1]), nxt] = 1.0
        return type("Out", (), {"logits": logits})()


def test_last_word_accuracy_with_known_answers(tokenizer, tmp_path):
    texts = ["the cat sat on the mat", "all that glitters is not gold", "measure twice"]
    path = tmp_path / "lambada.jsonl"
    path.write_text("\n".join(json.dumps({"text": t}) for t in texts))
    encoded = {tuple(tokenizer(t)["input_ids"]): tokenizer(t)["input_ids"] for t in texts}

    def perfect(ids):  # knows every text: predicts each next token of the text it is reading
        for full in encoded.values():
            if list(full[:ids.numel()]) == ids.tolist():
                return torch.tensor(full[1:ids.numel() + 1] + [0] * (ids.numel() - len(full) + 1))
        raise AssertionError("unknown text")

    assert last_token_accuracy(_Oracle(perfect), path, tokenizer, progress=False) == 1.0
    assert last_token_accuracy(_Oracle(lambda ids: torch.zeros(ids.numel(), dtype=torch.long)), path, tokenizer,
                               progress=False) == 0.0

    def wrong_on_gold(ids):  # right except for the last letter of "gold"
        out = perfect(ids)
        if tokenizer.decode(ids.tolist()).startswith("<s>all") or tokenizer.decode(ids.tolist()).startswith("all"):
            out[-2] = tokenizer("x")["input_ids"][-1]
        return out

    assert last_token_accuracy(_Oracle(wrong_on_gold), path, tokenizer, progress=False) == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="no context"):
        last_token_accuracy(_Oracle(perfect), ["single"], tokenizer, progress=False)

    class AppendsEos:  # a tokenizer that ends every encoding with EOS: the target must still be the word
        eos_token_id = 2

        def __call__(self, text, add_special_tokens=True):
            return {"input_ids": tokenizer(text)["input_ids"] + ([2] if add_special_tokens else [])}

    assert last_token_accuracy(_Oracle(perfect), path, AppendsEos(), progress=False) == 1.0


def test_fp_against_quantized(tokenizer, text_file, tmp_path):
    fp = make_model("llama")
    q = copy.deepcopy(fp)
    sq.smoothquant(q, text_file, sq.SmoothQuantConfig(progress=False, num_samples=4, seq_len=64), tokenizer=tokenizer)
    ppl_fp = perplexity(fp, text_file, tokenizer, seq_len=64, progress=False)
    ppl_q = perplexity(q, text_file, tokenizer, seq_len=64, progress=False)
    assert abs(ppl_q - ppl_fp) / ppl_fp < 0.02, (ppl_fp, ppl_q)
    lines = [s.strip() + "." for s in TEXT.split(".")[:5] if s.strip()]
    acc_fp = last_token_accuracy(fp, lines, tokenizer, progress=False)
    acc_q = last_token_accuracy(q, lines, tokenizer, progress=False)
    assert 0.0 <= acc_q <= 1.0 and abs(acc_q - acc_fp) <= 0.4
    report = layer_sqnr(fp, q, text_file, tokenizer, num_samples=2, seq_len=64, progress=False)
    quantized = [n for n, m in q.named_modules() if isinstance(m, sq.W8A8Linear)]
    assert list(report) == quantized + ["logits"]
    assert all(math.isfinite(v) and v > 15.0 for v in report.values()), report
    table = format_sqnr_table(report)
    assert "model.layers.0.self_attn.q_proj" in table and "logits" in table
    print("\n" + table)


def test_layer_sqnr_needs_matching_models():
    fp = make_model("llama")
    with pytest.raises(ValueError, match="no W8A8 modules"):
        layer_sqnr(fp, fp, calib_tokens(1, 8))
    q = make_model("opt")
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    with pytest.raises(ValueError, match="lacks modules"):
        layer_sqnr(fp, q, calib_tokens(1, 8))


# --------------------------------------------------------------------- audit fixes: limits, data forms

def test_seq_len_beyond_learned_positions_is_a_clear_error(tokenizer, text_file):
    model = make_model("opt")  # learned positions: max_position_embeddings=128 (table of 130 rows, offset 2)
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match=r"seq_len.* 512 tokens exceed the model's max_position_embeddings \(128\)"
                                         r".*--seq-len 128"):
        perplexity(model, text_file, tokenizer, progress=False)  # the default seq_len 512
    long_text = " ".join(["word"] * 40)  # 199 characters: one token each
    with pytest.raises(ValueError, match=r"text 1 .*199 tokens exceed the model's max_position_embeddings \(128\)"):
        last_token_accuracy(model, ["a short one", long_text], tokenizer, progress=False)
    q = copy.deepcopy(model)
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    with pytest.raises(ValueError, match=r"seq_len.* 200 tokens exceed the model's max_position_embeddings"):
        layer_sqnr(model, q, calib_tokens(1, 200), seq_len=256, progress=False)
    assert not calls  # refused before any forward
    assert math.isfinite(perplexity(model, text_file, tokenizer, seq_len=128, progress=False))  # 128 fits
    assert math.isfinite(perplexity(model, calib_tokens(1, 40)[0], progress=False))  # a 40-token window fits


def test_seq_len_beyond_rotary_context_only_warns(tokenizer, text_file):
    model = make_model("llama")  # rotary: runs beyond max_position_embeddings=128
    with pytest.warns(UserWarning, match=r"160 tokens are longer than the model's max_position_embeddings \(128\)"):
        assert math.isfinite(perplexity(model, text_file, tokenizer, seq_len=160, progress=False))


@pytest.mark.parametrize("kwargs,name", [(dict(max_windows=0), "max_windows"), (dict(max_windows=-1), "max_windows"),
                                         (dict(stride=0), "stride"), (dict(stride=-8), "stride"),
                                         (dict(seq_len=1), "seq_len"), (dict(seq_len=0), "seq_len"),
                                         (dict(max_windows=1.5), "max_windows")])
def test_perplexity_numeric_parameters_are_checked(kwargs, name):
    with pytest.raises(ValueError, match=rf"{name} \(--{name.replace('_', '-')}\) must be an integer >="):
        perplexity(make_model("llama"), torch.arange(40), progress=False, **kwargs)


def test_other_numeric_parameters_are_checked(tokenizer):
    fp = make_model("llama")
    with pytest.raises(ValueError, match=r"max_samples \(--max-samples\) must be an integer >= 1, got 0"):
        last_token_accuracy(fp, ["the cat sat"], tokenizer, max_samples=0, progress=False)
    q = copy.deepcopy(fp)
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    for kwargs, name in ((dict(num_samples=0), "num_samples"), (dict(seq_len=-1), "seq_len")):
        with pytest.raises(ValueError, match=rf"{name} \(--{name.replace('_', '-')}\) must be an integer >= 1"):
            layer_sqnr(fp, q, calib_tokens(1, 8), progress=False, **kwargs)


def test_layer_sqnr_rejects_a_reference_of_other_shapes():
    q = make_model("llama")
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    other = make_model("mistral")  # the same module names, but 2 KV heads: k_proj / v_proj are 64 -> 32
    calls = []
    other.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match=r"module 'model.layers.0.self_attn.k_proj' has in_features=64, "
                                         r"out_features=32 in the reference .* but in_features=64, out_features=64 "
                                         r"in the quantized model: the reference must be the floating-point model "
                                         r"that was quantized"):
        layer_sqnr(other, q, calib_tokens(1, 8), progress=False)
    assert not calls


def test_perplexity_of_texts_from_a_list_or_jsonl(tokenizer, tmp_path):
    model = make_model("llama")
    texts = [s.strip() + "." for s in TEXT.split(".")[:5] if s.strip()]
    joined = tmp_path / "joined.txt"
    joined.write_text("\n\n".join(texts), encoding="utf-8")
    expected = perplexity(model, joined, tokenizer, seq_len=64, progress=False)
    assert perplexity(model, texts, tokenizer, seq_len=64, progress=False) == expected
    for name, payload in (("eval.jsonl", "\n".join(json.dumps({"text": t}) for t in texts)),
                          ("eval.json", json.dumps([{"text": t} for t in texts]))):
        path = tmp_path / name
        path.write_text(payload, encoding="utf-8")
        assert perplexity(model, path, tokenizer, seq_len=64, progress=False) == expected  # the texts, not JSON
    with pytest.raises(ValueError, match="data: a list must hold texts"):
        perplexity(model, [1.5, "x"], tokenizer, progress=False)
    as_json = tmp_path / "texts.json"
    as_json.write_text(json.dumps(texts))
    acc = last_token_accuracy(model, as_json, tokenizer, progress=False)
    assert acc == last_token_accuracy(model, texts, tokenizer, progress=False)


def test_perplexity_progress_bar_ends_full(capsys):
    model = make_model("llama")
    # 40 tokens, windows of 16 every 8: starts 0, 8, 16, 24 (the last reaches the end); 32 is never evaluated
    perplexity(model, calib_tokens(1, 40)[0], seq_len=16, stride=8, progress=True)
    err = capsys.readouterr().err
    assert "4/4" in err and "/5" not in err
    perplexity(model, calib_tokens(1, 40)[0], seq_len=16, stride=8, max_windows=2, progress=True)
    assert "2/2" in capsys.readouterr().err
