"""How calibration data is read: lists of token batches obey the limits, bool / empty token ids are refused,
whitespace-only texts count as empty, a large text file is read only as far as needed, a UTF-8 byte-order mark
is dropped, a file that is not UTF-8 is named, and numpy token ids are accepted."""
import copy
import json
import re

import numpy as np
import pytest
import torch

import sq_kernels as sq
from sq_kernels import calibration
from sq_kernels.calibration import (calibration_batches, calibration_samples, collect_act_stats, read_text_file,
                                    read_texts)
from sq_kernels.evaluation import _token_stream, layer_sqnr, perplexity

from conftest import TEXT, calib_tokens, char_tokenizer, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

BOM = b"\xef\xbb\xbf"


def shapes(batches):
    return [tuple(b.shape) for b in batches]


# ------------------------------------------------------------------------ B4: lists of [B, T] token tensors


def test_a_list_of_token_batches_obeys_num_samples_seq_len_and_batch_size():
    tokens = calib_tokens(16, 64)
    assert shapes(calibration_batches([tokens], num_samples=2, seq_len=16)) == [(1, 16), (1, 16)]
    assert shapes(calibration_batches([tokens, tokens], num_samples=20, seq_len=8, batch_size=8)) == [(8, 8)] * 2 + [
        (4, 8)]
    listed = calibration_batches([tokens], num_samples=3, seq_len=16, batch_size=3)
    alone = calibration_batches(tokens, num_samples=3, seq_len=16, batch_size=3)
    assert shapes(listed) == [(3, 16)] and torch.equal(listed[0], alone[0])  # wrapping in a list changes nothing
    assert torch.equal(listed[0], tokens[:3, :16])


def test_a_list_of_token_batches_gives_the_statistics_of_the_same_tensor():
    model = make_model("llama")
    tokens = calib_tokens(16, 64)
    listed = collect_act_stats(model, [tokens], num_samples=2, seq_len=16, progress=False)
    alone = collect_act_stats(model, tokens, num_samples=2, seq_len=16, progress=False)
    assert (listed.meta["num_samples"], listed.meta["num_tokens"], listed.meta["seq_len"]) == (2, 32, 16)
    assert listed.names() == alone.names()
    assert all(torch.equal(listed[n], alone[n]) for n in alone.names())


def test_the_result_of_calibration_batches_is_used_as_it_is():
    """smoothquant hands its batches (cut by its config) to collect_act_stats and smooth_ with their defaults."""
    model = make_model("llama")
    batches = calibration_batches(calib_tokens(8, 32), num_samples=8, seq_len=32, batch_size=4)
    assert shapes(batches) == [(4, 32), (4, 32)]
    assert calibration_batches(batches, num_samples=2, seq_len=8) is batches
    stats = collect_act_stats(model, batches, progress=False)  # batch_size=1 by default: not regrouped
    assert (stats.meta["num_batches"], stats.meta["num_samples"]) == (2, 8)
    assert shapes(calibration_batches(list(batches), num_samples=2, seq_len=8)) == [(1, 8), (1, 8)]  # a plain list


def test_smoothquant_with_alpha_auto_on_a_list_of_token_batches():
    model = make_model("llama")
    config = sq.SmoothQuantConfig(alpha="auto", num_samples=4, seq_len=16, batch_size=2, progress=False)
    report = sq.smoothquant(model, [calib_tokens(8, 32)], config)
    assert report.smoothing.stats.meta["num_samples"] == 4 and report.smoothing.stats.meta["seq_len"] == 16
    assert report.smoothing.stats.meta["num_batches"] == 2


def test_layer_sqnr_on_a_list_of_token_batches_obeys_its_limits():
    fp = make_model("llama")
    q = copy.deepcopy(fp)
    sq.quantize_(q, sq.SmoothQuantConfig(progress=False, smooth=False))
    seen = []
    fp.model.embed_tokens.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape)))
    report = layer_sqnr(fp, q, [calib_tokens(16, 64)], num_samples=2, seq_len=16, progress=False)
    assert seen == [(1, 16), (1, 16)] and "logits" in report


@pytest.mark.parametrize("data", [[torch.ones(2, 4, dtype=torch.bool)], torch.ones(2, 4, dtype=torch.bool),
                                  [np.ones((2, 4), dtype=bool)], [[True, False]]],
                         ids=["list-of-tensor", "tensor", "list-of-numpy", "list-of-python-bools"])
def test_bool_token_ids_are_refused(data):
    with pytest.raises(ValueError, match=r"data(\[0\])?: "):
        calibration_batches(data)


def test_bool_token_ids_say_so():
    with pytest.raises(ValueError, match=r"data\[0\]: token ids must be integers, got torch.bool"):
        calibration_batches([torch.ones(2, 4, dtype=torch.bool)])
    with pytest.raises(ValueError, match=r"data: token ids must be an integer tensor, got torch.bool"):
        calibration_batches(torch.ones(2, 4, dtype=torch.bool))


@pytest.mark.parametrize("shape", [(0, 4), (2, 0), (0,)])
def test_empty_token_tensors_are_a_value_error_not_a_crash_in_the_model(shape):
    model = make_model("llama")
    empty = torch.zeros(shape, dtype=torch.long)
    with pytest.raises(ValueError, match=re.escape(f"data[1]: empty token ids (shape {tuple(shape)})")):
        collect_act_stats(model, [calib_tokens(2, 8), empty], progress=False)
    with pytest.raises(ValueError, match=re.escape(f"data: the token tensor is empty (shape {tuple(shape)})")):
        collect_act_stats(model, empty, progress=False)
    with pytest.raises(ValueError, match=re.escape(f"data[0]: empty token ids (shape {tuple(shape)})")):
        collect_act_stats(model, [empty.numpy()], progress=False)


def test_empty_id_list_and_three_d_tensor_are_refused():
    with pytest.raises(ValueError, match=r"data\[1\]: empty token ids"):
        calibration_batches([[1, 2], []])
    with pytest.raises(ValueError, match=r"data\[0\]: a token tensor must be \[T\] or \[B, T\], got shape \(2, 2, 4\)"):
        calibration_batches([torch.zeros(2, 2, 4, dtype=torch.long)])
    with pytest.raises(ValueError, match=r"data\[0\]: token ids must be integers, got torch.complex64"):
        calibration_batches([torch.zeros(2, 4, dtype=torch.complex64)])


# ----------------------------------------------------------------------- U3: whitespace-only texts are empty


@pytest.mark.parametrize("content", ["", "   \n\n  \t\n", "\r\n \u3000\n"])
def test_a_text_file_of_whitespace_holds_no_text(tmp_path, tokenizer, content):
    path = tmp_path / "ws.txt"
    path.write_bytes(content.encode())
    with pytest.raises(ValueError, match=r"data: '.*ws\.txt' holds no text"):
        calibration_samples(path, tokenizer, num_samples=2, seq_len=8)


def test_whitespace_before_the_text_is_kept(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(calibration, "FIRST_PIECE_CHARS", 16)
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", 8)
    path = tmp_path / "late.txt"
    path.write_text(" " * 300 + "\n" + "text at last")  # enough tokens before any text: the rest is scanned
    samples = calibration_samples(path, tokenizer, num_samples=2, seq_len=8)  # 16 tokens: only spaces
    assert torch.cat(samples).tolist() == tokenizer(" " * 16)["input_ids"]
    path.write_text(" \n" * 200)  # whitespace well past the first piece: still no text
    with pytest.raises(ValueError, match="holds no text"):
        calibration_samples(path, tokenizer, num_samples=2, seq_len=8)


def test_whitespace_only_records_are_skipped_like_empty_ones(tmp_path, tokenizer):
    path = tmp_path / "ws.jsonl"
    records = [{"text": "   "}, {"text": "one two"}, "\n\t", {"text": ""}, {"text": "three"}, {"text": "four"}]
    path.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    samples = calibration_samples(path, tokenizer, num_samples=2, seq_len=64)  # the blank ones take no place
    assert [s.tolist() for s in samples] == [tokenizer("one two")["input_ids"], tokenizer("three")["input_ids"]]
    assert len(calibration_samples([" ", "a b", "\n", "c"], tokenizer, num_samples=2)) == 2


@pytest.mark.parametrize("suffix,content", [(".jsonl", '{"text": "  "}\n"\\n\\t"\n'), (".jsonl", "\n \n"),
                                            (".json", json.dumps([" ", {"text": "\n"}]))])
def test_a_json_file_of_blank_texts_holds_no_text(tmp_path, tokenizer, suffix, content):
    path = tmp_path / f"blank{suffix}"
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"data: '.*blank\{suffix}' holds no text"):
        calibration_samples(path, tokenizer, num_samples=2, seq_len=8)


def test_only_blank_texts_in_a_list_give_no_samples(tokenizer):
    with pytest.raises(ValueError, match="no calibration samples .*whitespace-only texts"):
        calibration_samples(["  ", {"text": "\n"}], tokenizer)


# ------------------------------------------------------------ U4: a large text file is read only as needed


def counting(tokenizer, calls):
    """A callable tokenizer that records each text it is given."""
    def encode(text):
        calls.append(text)
        return tokenizer(text)["input_ids"]
    return encode


def test_a_large_text_file_is_tokenized_only_as_far_as_needed(tmp_path, tokenizer):
    path = tmp_path / "big.txt"
    line = TEXT[:99] + "\n"
    path.write_text(line * 50_000)  # 5 MB
    calls = []
    samples = calibration_samples(path, counting(tokenizer, calls), num_samples=4, seq_len=32)
    assert [s.numel() for s in samples] == [32] * 4
    assert torch.cat(samples).tolist() == tokenizer((line * 2)[:128])["input_ids"]
    assert sum(len(c) for c in calls) <= calibration.FIRST_PIECE_CHARS  # not 5 MB
    assert all(c.endswith("\n") for c in calls)  # cut after a newline


def test_pieces_are_cut_at_newlines_and_give_the_tokens_of_the_whole_file(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(calibration, "FIRST_PIECE_CHARS", 64)
    monkeypatch.setattr(calibration, "TOKEN_CHARS", 0)  # a first piece of 64 characters
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", 16)
    path = tmp_path / "lines.txt"
    text = "".join(f"line {i}: {TEXT[i:i + 30 + i % 17]}\n" for i in range(200))
    path.write_text(text)
    calls = []
    samples = calibration_samples(path, counting(tokenizer, calls), num_samples=10, seq_len=50)
    assert len(calls) >= 2 and all(c.endswith("\n") for c in calls)
    assert sum(len(c) for c in calls) < len(text) // 2  # stopped early
    # a character tokenizer gives the same ids in pieces as whole
    assert torch.cat(samples).tolist() == tokenizer(text)["input_ids"][:500]


def test_a_long_line_is_cut_at_whitespace_or_at_the_piece_size(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(calibration, "FIRST_PIECE_CHARS", 64)
    monkeypatch.setattr(calibration, "TOKEN_CHARS", 0)  # a first piece of 64 characters
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", 16)
    for name, text in (("spaces.txt", "word " * 400), ("solid.txt", "x" * 2000)):
        path = tmp_path / name
        path.write_text(text)
        calls = []
        samples = calibration_samples(path, counting(tokenizer, calls), num_samples=4, seq_len=50)
        assert torch.cat(samples).tolist() == tokenizer(text)["input_ids"][:200]
        assert len(calls) > 1 and sum(len(c) for c in calls) < len(text)
        if name == "spaces.txt":
            assert all(c.endswith(" ") for c in calls[:-1])


def test_only_the_first_piece_gets_the_tokenizers_special_tokens(tmp_path, monkeypatch):
    from tokenizers.processors import TemplateProcessing
    encode = calibration._encode
    tok = char_tokenizer()
    tok._tokenizer.post_processor = TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok("ab")["input_ids"][0] == 1
    path = tmp_path / "bos.txt"
    text = "".join(f"{TEXT[i:i + 40]}\n" for i in range(100))
    path.write_text(text)
    whole = calibration_samples(path, tok, num_samples=8, seq_len=64)  # fits in the first piece: as whole
    assert torch.cat(whole).tolist() == tok(text)["input_ids"][:512]
    monkeypatch.setattr(calibration, "FIRST_PIECE_CHARS", 64)
    monkeypatch.setattr(calibration, "TOKEN_CHARS", 0)
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", 16)
    calls = []
    monkeypatch.setattr(calibration, "_encode", lambda t, text, special_tokens=True: calls.append(text) or
                        encode(t, text, special_tokens))
    pieces = torch.cat(calibration_samples(path, tok, num_samples=8, seq_len=64))
    assert len(calls) >= 2 and pieces[0] == 1 and (pieces == 1).sum() == 1  # one BOS, at the start
    assert pieces.tolist() == tok(text)["input_ids"][:512]


def test_a_small_file_gives_the_ids_of_tokenizing_it_whole(tmp_path, tokenizer):
    path = tmp_path / "small.txt"
    text = "\n".join(TEXT[i:i + 70] for i in range(0, len(TEXT), 70)) * 3
    path.write_text(text)
    calls = []
    samples = calibration_samples(path, counting(tokenizer, calls), num_samples=6, seq_len=64)
    assert calls == [text]  # one call, on the whole file
    assert torch.cat(samples).tolist() == tokenizer(text)["input_ids"][:384]


def test_perplexity_still_reads_the_whole_file(tmp_path, tokenizer, monkeypatch):
    monkeypatch.setattr(calibration, "FIRST_PIECE_CHARS", 64)
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", 16)
    path = tmp_path / "ppl.txt"
    text = "".join(f"{TEXT[i:i + 40]}\n" for i in range(100))
    path.write_text(text)
    assert _token_stream(path, tokenizer).tolist() == tokenizer(text)["input_ids"]


@pytest.mark.parametrize("block", [1, 2, 3, 5, 7, 64])
def test_reading_in_blocks_gives_the_text_read_text_gives(tmp_path, monkeypatch, block):
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", block)
    path = tmp_path / "mixed.txt"
    raw = "caf\u00e9 \u20ac\r\n\U0001F600 a\rb\r\n\r\nend\r".encode() * 3
    path.write_bytes(raw)
    assert read_text_file(path) == path.read_text(encoding="utf-8") == "".join(calibration._text_blocks(path, block))
    path.write_bytes(BOM + raw)
    assert read_text_file(path) == path.read_text(encoding="utf-8-sig")


# --------------------------------------------------------------------------------------- U8: a UTF-8 BOM


def test_a_byte_order_mark_is_dropped_from_txt_jsonl_and_json(tmp_path, tokenizer):
    txt, jsonl, js = tmp_path / "bom.txt", tmp_path / "bom.jsonl", tmp_path / "bom.json"
    txt.write_bytes(BOM + b"hello world\n")
    jsonl.write_bytes(BOM + b'{"text": "hello world"}\n"second"\n')
    js.write_bytes(BOM + b'["hello world"]')
    expected = tokenizer("hello world\n")["input_ids"]
    assert calibration_samples(txt, tokenizer, num_samples=1, seq_len=12)[0].tolist() == expected
    assert 0 not in calibration_samples(txt, tokenizer, num_samples=1, seq_len=12)[0].tolist()  # no <unk>
    assert read_texts(jsonl) == ["hello world", "second"] and read_texts(js) == ["hello world"]
    assert calibration_samples(jsonl, tokenizer, num_samples=2)[0].tolist() == tokenizer("hello world")["input_ids"]
    assert _token_stream(txt, tokenizer).tolist() == expected  # perplexity too


# ---------------------------------------------------------------------------- a file that is not UTF-8


@pytest.mark.parametrize("suffix", [".txt", ".jsonl", ".json"])
@pytest.mark.parametrize("bom", [b"", BOM])
def test_a_file_that_is_not_utf8_is_named_with_the_byte(tmp_path, monkeypatch, tokenizer, suffix, bom):
    monkeypatch.setattr(calibration, "TEXT_BLOCK_BYTES", 7)  # the bad byte lies in a later block
    path = tmp_path / f"latin1{suffix}"
    head = '"caf\u00e9 au lait ' if suffix != ".txt" else "caf\u00e9 au lait "
    data = bom + head.encode() + "na\u00efve\"".encode("latin-1")
    path.write_bytes(data)
    bad = data.index(b"\xef", len(bom) + 5)  # the latin-1 i-diaeresis
    with pytest.raises(ValueError, match=rf"latin1\{suffix} is not UTF-8 text \(byte {bad} cannot be decoded\)"):
        calibration_samples(str(path), tokenizer, num_samples=2, seq_len=8)


def test_a_character_cut_by_the_end_of_the_file_is_not_utf8(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("ab\u20ac".encode()[:-1])
    with pytest.raises(ValueError, match=r"cut\.txt is not UTF-8 text \(byte 2 cannot be decoded\)"):
        read_text_file(path)


# ------------------------------------------------------------------------------------------ numpy token ids


def test_numpy_token_ids_are_accepted_like_tensors():
    tokens = calib_tokens(4, 16)
    array = tokens.numpy().astype(np.int32)
    for data, expected in ((array, tokens), ([array[0], array[1]], tokens[:2]), (array[0], tokens[0:1]),
                           ([list(array[0].astype(np.int64)), [np.int16(5), 6]], None)):
        samples = calibration_samples(data, num_samples=8, seq_len=16)
        assert all(s.dtype == torch.long for s in samples)
        if expected is not None:
            assert torch.equal(torch.stack(samples), expected)
        else:
            assert samples[0].tolist() == tokens[0].tolist() and samples[1].tolist() == [5, 6]


def test_numpy_values_that_are_not_token_ids_are_refused():
    with pytest.raises(ValueError, match=r"data: token ids must be integers, got torch.float64"):
        calibration_samples(np.zeros((2, 4)))
    with pytest.raises(ValueError, match=r"data\[0\]: token ids must be integers, got torch.float32"):
        calibration_samples([np.zeros(4, dtype=np.float32)])
    with pytest.raises(ValueError, match=r"data: expected integer token ids, got a ndarray of dtype <U1"):
        calibration_samples(np.array(["a", "b"]))
    with pytest.raises(ValueError, match=r"got a list holding a float \(2\.5\); token ids are integers"):
        calibration_samples([[1, 2.5]])


def test_perplexity_accepts_numpy_token_ids():
    model = make_model("llama")
    ids = calib_tokens(1, 40)[0]
    expected = perplexity(model, ids, seq_len=16, progress=False)
    assert perplexity(model, ids.numpy(), seq_len=16, progress=False) == expected
    assert perplexity(model, [np.int64(v) for v in ids.tolist()], seq_len=16, progress=False) == expected
    with pytest.raises(ValueError, match="token ids must be integers, got torch.bool"):
        perplexity(model, np.ones(8, dtype=bool), seq_len=4, progress=False)
