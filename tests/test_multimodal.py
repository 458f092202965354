"""Multimodal models around a supported language model (Gemma 3, LLaVA, Mistral 3): the language model is
smoothed and quantized with its family's table, the vision tower and projector stay in floating point (the
calibration data is text only), and the quantized model still reads images, saves and loads."""
import copy

import pytest
import torch

import sq_kernels as sq
from sq_kernels.families import family_of
from sq_kernels.nn import W8A8Linear

from conftest import MULTIMODAL, calib_tokens, make_model, smoothquant_vs_naive, sqnr
from conftest import logits as _logits

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT_FAMILY = {"gemma3": "Gemma3", "llava": "Llama", "mistral3": "Mistral"}


def _cfg(**kw):
    return sq.SmoothQuantConfig(progress=False, **kw)


def _image_inputs(model, family):
    cfg = model.config
    n = cfg.mm_tokens_per_image if family == "gemma3" else (28 // 14) ** 2
    ids = calib_tokens(1, 12, seed=9) % (cfg.text_config.vocab_size - 4)
    ids[0, 2:2 + n] = cfg.image_token_index
    kw = dict(input_ids=ids, pixel_values=torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(2)))
    if family == "mistral3":
        kw["image_sizes"] = torch.tensor([[28, 28]])
    return kw


@pytest.mark.parametrize("family", MULTIMODAL)
def test_language_model_table(family):
    model = make_model(family, outliers=False)
    spec = family_of(model)
    assert spec.name == f"{TEXT_FAMILY[family]} in {type(model).__name__}"
    assert spec.layers == "model.language_model.layers" and spec.sub_config == "text_config"
    assert {p for p, _ in spec.keep_fp_modules} >= {"model.vision_tower.*", "model.multi_modal_projector.*"}
    assert all("calibration is text-only" in why for _, why in spec.keep_fp_modules)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_smoothquant_beats_naive_and_keeps_the_vision_tower(family, capsys):
    fp = make_model(family)
    smoothed, report, sq_db, naive_db = smoothquant_vs_naive(fp, family, capsys)
    assert sq_db >= 20.0 and sq_db >= naive_db + 10.0
    language = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear) and ".language_model." in n]
    outside = [n for n, m in fp.named_modules() if isinstance(m, torch.nn.Linear)
               and n.startswith(("model.vision_tower.", "model.multi_modal_projector."))]
    assert language and outside
    assert set(report.converted) == set(language)
    assert all("outside the language model" in report.kept[n] for n in outside)
    assert report.kept["lm_head"]
    assert all(type(smoothed.get_submodule(n)) is type(fp.get_submodule(n)) for n in outside)
    assert set(report.smoothing.alphas) == {f"model.language_model.layers.{i}" for i in range(2)}


@pytest.mark.parametrize("family", MULTIMODAL)
def test_smoothing_is_neutral_and_leaves_the_vision_tower(family):
    fp = make_model(family)
    smoothed = copy.deepcopy(fp)
    stats = sq.collect_act_stats(smoothed, calib_tokens(), progress=False)
    sq.smooth_(smoothed, stats, _cfg())
    x = calib_tokens(2, 16, seed=3)
    ref = _logits(fp, x)
    assert (_logits(smoothed, x) - ref).abs().max() <= 1e-4 * ref.abs().max()
    for (name, a), (_, b) in zip(fp.named_parameters(), smoothed.named_parameters()):
        if not name.startswith("model.language_model."):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("family", MULTIMODAL)
def test_quantized_model_still_reads_images_saves_and_loads(family, tmp_path):
    fp = make_model(family)
    q = copy.deepcopy(fp)
    sq.smoothquant(q, calib_tokens(), _cfg())
    inputs = _image_inputs(fp, family)
    with torch.no_grad():
        ref, out = fp(**inputs).logits, q(**inputs).logits
        text_only = fp(input_ids=inputs["input_ids"]).logits
    assert not torch.allclose(ref, text_only)  # the image reaches the language model
    assert sqnr(ref, out) >= 20.0
    sq.save_quantized(q, tmp_path)
    loaded = sq.load_quantized(tmp_path)
    assert type(loaded) is type(q) and isinstance(loaded.model.language_model.layers[0].self_attn.q_proj, W8A8Linear)
    with torch.no_grad():
        assert torch.equal(loaded(**inputs).logits, out)
    prompt = calib_tokens(1, 6, seed=4)
    kw = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(prompt, **kw), q.generate(prompt, **kw))


def test_wrapper_of_an_unsupported_language_model_is_refused():
    from transformers import LlavaConfig, LlavaForConditionalGeneration
    from conftest import tiny_config
    cfg = LlavaConfig(text_config=tiny_config("llama").to_dict(), image_token_index=127,
                      vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, image_size=28, patch_size=14))
    model = LlavaForConditionalGeneration(cfg)
    model.config.text_config.model_type = "gpt_bigcode"  # a language model without a table here
    with pytest.raises(sq.families.UnsupportedModelError, match="no smoothing table for model_type 'llava'"):
        family_of(model)


@pytest.mark.parametrize("family", ["llava", "gemma3"])
def test_cli_quantizes_a_multimodal_model(family, tmp_path, tokenizer, capsys):
    from sq_kernels.cli import main
    from conftest import TEXT
    src = tmp_path / family
    make_model(family).save_pretrained(src)
    tokenizer.save_pretrained(src)
    (tmp_path / "calib.txt").write_text(TEXT, encoding="utf-8")
    out = tmp_path / "q"
    assert main(["quantize", str(src), str(out), "--data", str(tmp_path / "calib.txt"), "--num-samples", "2",
                 "--seq-len", "32", "--no-progress"]) == 0, capsys.readouterr().err
    assert "outside the language model (vision_tower)" in capsys.readouterr().out
    loaded = sq.load_quantized(out)
    assert isinstance(loaded.model.language_model.layers[1].mlp.down_proj, W8A8Linear)


@pytest.mark.parametrize("family", MULTIMODAL)
def test_family_auto_rebuilds_the_table(family):
    model = make_model(family)
    auto, table = family_of(model, "auto"), family_of(model)
    assert auto.layers == table.layers and auto.keep_fp_modules == table.keep_fp_modules

    def rows(spec):
        return [(g.source, g.targets, g.weight_offset) for g in spec.active_groups(model.config)]
    assert rows(auto) == rows(table) and not auto.extra["notes"]


# vLLM's multimodal models map a checkpoint's transformers-5 names with these prefixes (hf_to_vllm_mapper:
# model.language_model. -> language_model.model., lm_head. -> language_model.lm_head., ...), and its
# compressed-tensors config maps the `ignore` list the same way: the export must use exactly these roots
VLLM_PREFIXES = ("model.language_model.", "model.vision_tower.", "model.multi_modal_projector.", "lm_head.")


@pytest.mark.parametrize("family", MULTIMODAL)
def test_export_uses_the_names_vllm_maps(family, tmp_path):
    import json

    from safetensors import safe_open

    from sq_kernels.export import export_compressed_tensors, load_compressed_tensors
    q = make_model(family)
    sq.smoothquant(q, calib_tokens(), _cfg())
    out = export_compressed_tensors(q, tmp_path / "ct", progress=False)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith(VLLM_PREFIXES) for k in keys), [k for k in keys if not k.startswith(VLLM_PREFIXES)]
    int8 = {k.rsplit(".", 1)[0] for k in keys if k.endswith(".weight_scale")}
    assert int8 and all(k.startswith("model.language_model.layers.") for k in int8)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    fp_linears = {n for n, m in q.named_modules() if isinstance(m, torch.nn.Linear)}  # MHA out_proj too
    assert set(ignore) == fp_linears and "lm_head" in ignore
    assert any(n.startswith("model.vision_tower.") for n in ignore) and all(n.startswith(VLLM_PREFIXES[:3]) or
                                                                             n == "lm_head" for n in ignore)
    inputs = _image_inputs(q, family)
    with torch.no_grad():
        assert torch.equal(load_compressed_tensors(out)(**inputs).logits, q(**inputs).logits)
