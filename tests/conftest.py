"""Shared fixtures for the CPU tests: tiny models of every supported family, built from ``transformers``
configs (hidden sizes multiples of 16), with planted activation outliers, and a character-level tokenizer
built locally (nothing is downloaded)."""
from __future__ import annotations

import math

import pytest
import torch

VOCAB = 128
OUTLIER_CHANNELS = (3, 17, 42)   # norm channels scaled up, as in real LLMs (a few, persistent across tokens)
OUTLIER_FACTOR = 40.0

FAMILIES = ("opt", "llama", "mistral", "mixtral", "bloom", "falcon", "qwen2")
NEWER_FAMILIES = ("qwen3", "phi3", "qwen3_moe", "qwen2_moe", "gemma", "gemma2", "gemma3_text")
# multimodal models around a supported language model (a one-layer vision tower); built with
# AutoModelForImageTextToText, run on text only
MULTIMODAL = ("gemma3", "llava", "mistral3")


def tiny_config(family: str, **overrides):
    """A 2-layer, hidden-64 config of ``family`` (every linear dimension a multiple of 16)."""
    import transformers as T
    common = dict(vocab_size=VOCAB, initializer_range=0.08)
    if family == "opt":
        cfg = T.OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=128, word_embed_proj_dim=64, init_std=0.08, **common)
    elif family == "llama":
        cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=4, max_position_embeddings=128, **common)
    elif family == "mistral":
        cfg = T.MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, max_position_embeddings=128, **common)
    elif family == "mixtral":
        cfg = T.MixtralConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                              max_position_embeddings=128, **common)
    elif family == "bloom":
        cfg = T.BloomConfig(hidden_size=64, n_layer=2, n_head=4, **common)
    elif family == "falcon":
        cfg = T.FalconConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, **common)
    elif family == "qwen2":
        cfg = T.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, max_position_embeddings=128, **common)
    elif family == "qwen3":
        cfg = T.Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, **common)
    elif family == "phi3":
        cfg = T.Phi3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, **common)
    elif family == "qwen3_moe":  # layer 0 dense (mlp_only_layers), layer 1 sparse
        cfg = T.Qwen3MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
                               num_experts_per_tok=2, mlp_only_layers=[0], max_position_embeddings=128, **common)
    elif family == "qwen2_moe":
        cfg = T.Qwen2MoeConfig(hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                               shared_expert_intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                               num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, mlp_only_layers=[0],
                               max_position_embeddings=128, **common)
    elif family in ("gemma", "gemma2", "gemma3_text"):
        cls = {"gemma": T.GemmaConfig, "gemma2": T.Gemma2Config, "gemma3_text": T.Gemma3TextConfig}[family]
        cfg = cls(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=128, pad_token_id=0, **common)
    elif family in MULTIMODAL:
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                      patch_size=14)
        if family == "gemma3":
            cfg = T.Gemma3Config(text_config=tiny_config("gemma3_text").to_dict(), vision_config=vision,
                                 mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3,
                                 eoi_token_index=VOCAB - 2)
        elif family == "llava":
            cfg = T.LlavaConfig(text_config=tiny_config("llama").to_dict(), image_token_index=VOCAB - 1,
                                vision_config=dict(vision, model_type="clip_vision_model", projection_dim=32))
        else:
            cfg = T.Mistral3Config(text_config=tiny_config("mistral").to_dict(), image_token_index=VOCAB - 1,
                                   vision_config=dict(vision, model_type="pixtral", head_dim=16), spatial_merge_size=1)
    else:
        raise ValueError(family)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def plant_outliers(model, factor: float = OUTLIER_FACTOR, channels=OUTLIER_CHANNELS, spec=None) -> None:
    """Scale a few channels of every norm that feeds linears (the smoothing sources) by ``factor``, so the
    linears' inputs carry ``factor``-times outlier channels on every token, and scale the consumers' weight
    columns of those channels down by ``sqrt(factor)``: as in trained LLMs, an outlier channel's share of
    the output stays moderate (without this a random model's attention scores would be dominated by it)."""
    from sq_kernels.families import decoder_layers, family_of, get_submodule
    spec = family_of(model) if spec is None else spec
    channels = list(channels)
    with torch.no_grad():
        for _, layer in decoder_layers(model, spec):
            for group in spec.active_groups(model.config):
                if not group.present(layer):
                    continue
                weight, offset = get_submodule(layer, group.source).weight, group.weight_offset
                weight[channels] = (weight[channels] + offset) * factor - offset  # Gemma: the norm scales by 1 + w
                for target in group.targets:
                    module = get_submodule(layer, target)
                    weight = module.gate_up_proj if hasattr(module, "gate_up_proj") else module.weight
                    weight[..., channels] /= math.sqrt(factor)


def make_model(family: str, seed: int = 0, outliers: bool = True, dtype=torch.float32, **overrides):
    """A tiny random ``*ForCausalLM`` of ``family`` in eval mode, with planted outliers."""
    import transformers
    torch.manual_seed(seed)
    cfg = tiny_config(family, **overrides)
    auto = transformers.AutoModelForImageTextToText if family in MULTIMODAL else transformers.AutoModelForCausalLM
    model = auto.from_config(cfg).to(dtype).eval()
    if outliers:
        plant_outliers(model)
    return model


def calib_tokens(n: int = 8, length: int = 32, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, length), generator=g)


def sqnr(ref: torch.Tensor, test: torch.Tensor) -> float:
    ref, test = ref.detach().double(), test.detach().double()
    err = (ref - test).norm()
    return math.inf if err == 0 else float(20 * torch.log10(ref.norm() / err))


def char_tokenizer():
    """A local character-level ``PreTrainedTokenizerFast`` (ids < VOCAB)."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in [chr(i) for i in range(32, 127)] + ["\n"]:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                                eos_token="</s>")


TEXT = ("the quick brown fox jumps over the lazy dog. a smooth sea never made a skilled sailor. "
        "measure twice and cut once. the early bird catches the worm. all that glitters is not gold. ") * 6


@pytest.fixture
def one_thread():
    """Run a test with one intra-op thread: the tiny models' ops take microseconds, and on a small, busy CI
    machine a second OpenMP thread makes every op wait for a descheduled worker (100-1000x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer():
    return char_tokenizer()


@pytest.fixture
def model_dir(tmp_path, tokenizer):
    """A local tiny Llama directory (weights, config and tokenizer), as the CLI reads models."""
    path = tmp_path / "tiny-llama"
    make_model("llama").save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(TEXT, encoding="utf-8")
    return path


def logits(model, x):
    """The model's logits on token ids ``x``, without autograd."""
    with torch.no_grad():
        return model(x).logits


def naive_logits(fp, x):
    """Logits of naive W8A8 (a copy of ``fp`` quantized without smoothing, per-tensor dynamic activations):
    the baseline SmoothQuant must beat by a wide margin."""
    import copy

    import sq_kernels as sq
    naive = copy.deepcopy(fp)
    sq.quantize_(naive, sq.SmoothQuantConfig(scheme="O2", smooth=False, progress=False))
    return logits(naive, x)


def smoothquant_vs_naive(fp, label: str, capsys):
    """SmoothQuant a copy of ``fp`` on ``calib_tokens()`` and compare it and naive W8A8 with ``fp`` on other
    tokens; prints both SQNRs (``label`` names the line). Returns ``(smoothed, report, sq_db, naive_db)``."""
    import copy

    import sq_kernels as sq
    x = calib_tokens(4, 32, seed=7)
    ref = logits(fp, x)
    smoothed = copy.deepcopy(fp)
    report = sq.smoothquant(smoothed, calib_tokens(), sq.SmoothQuantConfig(progress=False))
    sq_db, naive_db = sqnr(ref, logits(smoothed, x)), sqnr(ref, naive_logits(fp, x))
    with capsys.disabled():
        print(f"\n[SQNR] {label:8s} SmoothQuant W8A8 {sq_db:6.2f} dB | naive W8A8 {naive_db:6.2f} dB")
    return smoothed, report, sq_db, naive_db


def quantized(family: str = "llama", **cfg):
    """A tiny ``family`` model (planted outliers) put through ``smoothquant`` with ``SmoothQuantConfig(**cfg)``."""
    import sq_kernels as sq
    model = make_model(family)
    sq.smoothquant(model, calib_tokens(), sq.SmoothQuantConfig(progress=False, **cfg))
    return model
