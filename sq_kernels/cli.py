"""``sq-kernels``: the command line over calibration, SmoothQuant conversion, checkpoints and evaluation.

    sq-kernels calibrate MODEL_DIR --data calib.txt --out stats.safetensors
    sq-kernels quantize  MODEL_DIR OUT_DIR --data calib.txt [--alpha 0.85|auto] [--scheme W8A8|O1|O2|O3]
    sq-kernels eval      MODEL_DIR (FP, quantized, or compressed-tensors INT8) [--reference FP_DIR] [--ppl wiki.txt] [--lambada lambada.jsonl]
    sq-kernels info      QUANTIZED_DIR
    sq-kernels export    QUANTIZED_DIR OUT_DIR      (compressed-tensors: vLLM's INT8 W8A8 format)
    sq-kernels bench     [--arch llama-2-7b] [--layers 4] [--batch 1] [--prompt 512] --device cuda

Models and tokenizers are read from local directories only (nothing is downloaded). Errors print one
line and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

DTYPES = ("auto", "float32", "float16", "bfloat16")


def _version() -> str:
    from . import __version__
    return __version__


def _dtype(name: str):
    import torch
    return None if name == "auto" else getattr(torch, name)


def _check_device(device: str | None, flag: str = "--device") -> None:
    """``flag`` names a device this machine has (before anything is loaded); None: not given."""
    from .checkpoint import check_device
    if device is not None:
        check_device(device, flag)


def _check_writable_file(path: str | None, flag: str, overwrite: bool = False) -> None:
    """An output file: its directory exists and it is not an existing file (unless --overwrite), checked
    before hours of work rather than after, and so that a mistyped flag cannot replace the user's data."""
    if path is None:
        return
    target = Path(path).resolve()
    if not target.parent.is_dir():
        raise ValueError(f"{flag} {path}: the directory {target.parent} does not exist")
    if target.is_dir():
        raise ValueError(f"{flag} {path} is a directory; give a file name")
    if target.exists() and not overwrite:
        raise ValueError(f"{flag} {path} already exists; choose a new name or pass --overwrite to replace it")


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _check_outputs(args, outputs: list[tuple[str, str | None]], model_dirs: list[tuple[str, str | None]],
                   inputs: list[tuple[str, str | None]]) -> None:
    """No output file may land in a model directory the command reads, replace an input file, or share its
    path with another output, --overwrite or not: each would silently destroy what the user gave."""
    given = [(flag, Path(p).resolve()) for flag, p in outputs if p is not None]
    for flag, out in given:
        for dflag, d in model_dirs:
            if d is not None and _inside(out, Path(d).resolve()):
                raise ValueError(f"{flag} {out} is inside {dflag} {d}: outputs never go into a model directory this "
                                 f"command reads; choose another place")
        for iflag, f in inputs:
            if f is not None and out == Path(f).resolve():
                raise ValueError(f"{flag} {out} is the {iflag} file: it would be overwritten; choose another name")
    for i, (flag, out) in enumerate(given):
        for other, out2 in given[i + 1:]:
            if out == out2:
                raise ValueError(f"{flag} and {other} name the same file {out}: one would overwrite the other")


def _check_data_file(path: str | None, flag: str) -> None:
    """A text data file that exists, is not empty and starts as UTF-8 text: checked before a model is loaded
    (the whole file is read later; a broken file should not cost the minutes a large model takes to load)."""
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{flag} {path}: no such file")
    if not p.is_file():
        raise ValueError(f"{flag} {path} is not a file")
    from .calibration import TEXT_BLOCK_BYTES, _text_blocks
    blocks = _text_blocks(p)  # the calibration's own reader: UTF-8, a byte-order mark dropped
    try:
        first = next(blocks, "")
    except ValueError as exc:  # not UTF-8: names the byte
        raise ValueError(f"{flag} {exc}") from None
    finally:
        blocks.close()
    if not first.strip() and p.stat().st_size <= TEXT_BLOCK_BYTES:  # a longer file may hold text further on
        raise ValueError(f"{flag} {path} holds no text" + (" (it is empty)" if not first else ""))


def _model_kind(path: str | None) -> str | None:
    """'sq' (an sq_kernels checkpoint), 'ct' (compressed-tensors) or None (another directory)."""
    from .checkpoint import is_quantized_checkpoint, quantization_method
    if path is None:
        return None
    if is_quantized_checkpoint(path):
        return "sq"
    return "ct" if quantization_method(path) == "compressed-tensors" else None


def _check_model_dir(path: str | None, flag: str) -> None:
    if path is not None and not Path(path, "config.json").is_file():
        raise ValueError(f"{flag} {path} is not a local Hugging Face model directory (no config.json)")


def _check_floating_point_model(path: str, flag: str, what: str) -> None:
    _check_model_dir(path, flag)
    kind = _model_kind(path)
    if kind is not None:
        form = "an sq_kernels quantized checkpoint" if kind == "sq" else "a compressed-tensors quantized checkpoint"
        raise ValueError(f"{flag} {path} is {form}; {what} needs the floating-point model")


def _check_tokenizer_dir(path: str | None) -> None:
    if path is not None and not Path(path).is_dir():
        raise ValueError(f"--tokenizer {path}: no such directory")


def _check_plot_file(path: str | None, flag: str, overwrite: bool = False) -> None:
    """A plot to write: a new file (see _check_writable_file) with a suffix matplotlib writes, and matplotlib
    importable, all checked before the long work the plot comes after."""
    if path is None:
        return
    _check_writable_file(path, flag, overwrite)
    from .plots import check_plot_path, require_matplotlib
    check_plot_path(path, flag)
    try:
        require_matplotlib(flag)
    except ImportError as exc:
        raise ValueError(str(exc)) from None


def _load_model(path: str, device: str, dtype: str):
    from .checkpoint import is_quantized_checkpoint, load_quantized, quantization_method
    if is_quantized_checkpoint(path):
        return load_quantized(path, device=device, dtype=dtype)
    if quantization_method(path) == "compressed-tensors":  # an INT8 W8A8 export (ours or llm-compressor's): runs on the W8A8 modules
        from .export import load_compressed_tensors
        return load_compressed_tensors(path, device=device, dtype=dtype)
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    if not Path(path, "config.json").is_file():
        raise ValueError(f"{path} is not a local Hugging Face model directory (no config.json)")
    kwargs = {"output_loading_info": True} if dtype == "auto" else {"dtype": _dtype(dtype), "output_loading_info": True}
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    except ValueError as exc:  # raised before any weight is read: not a causal LM class
        if "Unrecognized configuration class" not in str(exc):
            raise
        model, info = AutoModelForImageTextToText.from_pretrained(path, local_files_only=True, **kwargs)  # LLaVA, ...
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers initialised them at random: calibrating or evaluating that is meaningless
        raise ValueError(f"{path}: {len(missing)} weight(s) of {type(model).__name__} are missing from the checkpoint "
                         f"(e.g. {', '.join(missing[:3])}): these are not the weights for this config.json")
    return model.to(device).eval()


def _load_tokenizer(path: str | None, required: bool = True):
    if path is None:
        return None
    if required and not Path(path).is_dir():
        raise ValueError(f"{path}: no such directory, so no tokenizer could be loaded from it")
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # transformers raises several types for a directory without a tokenizer
        if required:
            raise ValueError(f"no tokenizer could be loaded from {path} ({type(exc).__name__}); "
                             f"pass --tokenizer DIR") from None
        return None


def _config_from_args(args):
    from .config import SmoothQuantConfig
    alpha = None
    if args.alpha is not None:
        alpha = "auto" if args.alpha == "auto" else _float(args.alpha, "--alpha")
    config = SmoothQuantConfig(alpha=alpha, scheme=args.scheme, weight=args.weight, activation=args.activation,
                               exclude=tuple(args.exclude or []) + (() if args.quantize_lm_head else ("lm_head",)),
                               smooth=not args.no_smooth,
                               fold_linear_pairs=args.fold_linear_pairs, num_samples=args.num_samples,
                               seq_len=args.seq_len, batch_size=args.batch_size,
                               calibration_device=args.calib_device, family=args.family,
                               progress=not args.no_progress)
    for pattern in args.fp:
        config.set_local(pattern, "fp")
    if args.include:
        config.include = tuple(args.include)
    return config


def _float(text: str, flag: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{flag} must be a number in [0, 1] or 'auto', got {text!r}") from None


def _is_text_file(data) -> bool:
    """Every --data file holds text (.txt, .jsonl, .json, or any other name, read as text): it needs a tokenizer."""
    return isinstance(data, str)


def _texts_or_path(path: str | None, field: str | None, flag: str):
    """A data file as given, or with --text-field, the texts of that field of a .jsonl / .json file. A JSON
    file is read here either way, so that a wrong field fails before any model is loaded."""
    if path is None:
        return path
    from .calibration import is_json_file, read_texts
    if field is None:
        if is_json_file(path) and Path(path).is_file():
            read_texts(path)  # checked now; the calibration reads it again (and warns about too little data)
        return path
    if not is_json_file(path):
        raise ValueError(f"--text-field {field} applies to .jsonl / .json files, and {flag} {path} is not one")
    return read_texts(path, field)


def _check_quantize_args(args, config) -> None:
    """Everything about quantize's arguments that can be wrong, before a model is loaded."""
    src, out = Path(args.model).resolve(), Path(args.out).resolve()
    if out == src or src in out.parents:
        raise ValueError(f"the output directory {args.out} is (inside) the input model {args.model}: the quantized "
                         "checkpoint must go to a directory of its own, so that the original model stays as it was")
    if out.is_file():
        raise ValueError(f"the output {args.out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not args.overwrite:
            raise ValueError(f"the output directory {args.out} is not empty; choose a new directory or pass --overwrite")
        from .checkpoint import QUANT_FILE, hf_weight_files
        weights = hf_weight_files(out)
        if weights:  # from_pretrained (and vLLM) would still find these beside the quantized checkpoint
            raise ValueError(f"the output directory {args.out} holds a model's weights ({', '.join(weights[:3])}); "
                             "--overwrite only replaces an earlier quantized checkpoint: choose another directory")
        if not (out / QUANT_FILE).is_file():  # the user's own files: config.json, tokenizer, notes...
            raise ValueError(f"the output directory {args.out} is not an earlier quantized checkpoint (it has no "
                             f"{QUANT_FILE}); --overwrite only replaces one: choose a new or empty directory (an "
                             f"interrupted earlier save leaves no {QUANT_FILE}: delete that directory yourself)")
    _check_floating_point_model(args.model, "MODEL", "quantize")
    _check_outputs(args, [("--save-stats", args.save_stats), ("--plot", args.plot)],
                   [("MODEL", args.model), ("--tokenizer", args.tokenizer), ("OUT", args.out)],
                   [("--data", args.data), ("--stats", args.stats)])
    _check_tokenizer_dir(args.tokenizer)
    if args.no_smooth and (args.alpha is not None or args.fold_linear_pairs or args.family):
        given = [f for f, v in (("--alpha", args.alpha is not None), ("--fold-linear-pairs", args.fold_linear_pairs),
                                ("--family", args.family)) if v]
        raise ValueError(f"{', '.join(given)} set{'s' if len(given) == 1 else ''} how to smooth, and --no-smooth "
                         f"smooths nothing: drop one of them")
    if args.quantize_lm_head and "lm_head" in (args.exclude or []):
        raise ValueError("--quantize-lm-head and --exclude lm_head contradict each other: drop one of them")
    if args.text_field is not None and not args.text_field.strip():
        raise ValueError("--text-field must name a JSON key, got an empty string")
    if args.data is None and args.stats is None:
        raise ValueError("--data is required (calibration text: a local .txt, .jsonl or .json file), unless --stats "
                         "gives statistics collected before")
    if args.stats and args.save_stats:
        raise ValueError("--save-stats writes the statistics of this run's calibration, and with --stats there is "
                         "none: drop one of them")
    if args.stats and config.alpha == "auto" and args.data is None:
        raise ValueError("--alpha auto evaluates each candidate alpha on calibration data: pass --data as well")
    if args.stats and not Path(args.stats).is_file():
        raise ValueError(f"--stats {args.stats}: no such file")
    if args.stats and config.alpha != "auto" and (args.data is not None or args.text_field is not None):
        given = " and ".join(f for f, v in (("--data", args.data), ("--text-field", args.text_field)) if v is not None)
        warnings.warn(f"{given} not used: with --stats, calibration data only feeds --alpha auto")
    elif args.data is not None:
        _check_data_file(args.data, "--data")
    _check_writable_file(args.save_stats, "--save-stats", args.overwrite)
    if args.plot and args.no_smooth:
        raise ValueError("--plot shows what smoothing did, and --no-smooth smooths nothing: drop one of them")
    _check_plot_file(args.plot, "--plot", args.overwrite)


def cmd_calibrate(args) -> int:
    from .calibration import check_positive_int, collect_act_stats
    _check_device(args.device)
    _check_device(args.calib_device, "--calib-device")
    for flag in ("num_samples", "seq_len", "batch_size"):
        check_positive_int(flag, getattr(args, flag))
    _check_floating_point_model(args.model, "MODEL", "calibration")
    _check_outputs(args, [("--out", args.out)], [("MODEL", args.model), ("--tokenizer", args.tokenizer)],
                   [("--data", args.data)])
    _check_writable_file(args.out, "--out", args.overwrite)
    _check_data_file(args.data, "--data")
    _check_tokenizer_dir(args.tokenizer)
    data = _texts_or_path(args.data, args.text_field, "--data")
    tokenizer = _load_tokenizer(args.tokenizer or args.model, required=_is_text_file(args.data))
    model = _load_model(args.model, args.device, args.dtype)
    stats = collect_act_stats(model, data, tokenizer, num_samples=args.num_samples, seq_len=args.seq_len,
                              batch_size=args.batch_size, progress=not args.no_progress, device=args.calib_device)
    stats.save(args.out)
    print(f"saved statistics of {len(stats)} modules ({stats.meta.get('num_tokens')} tokens) to {args.out}")
    return 0


def cmd_quantize(args) -> int:
    from .api import smoothquant
    from .calibration import ActStats
    from .checkpoint import parse_size, save_quantized
    config = _config_from_args(args)
    _check_quantize_args(args, config)
    _check_device(args.device)
    _check_device(args.calib_device, "--calib-device")
    parse_size(args.max_shard_size, "--max-shard-size")  # a typo fails now, not after calibrating
    stats = ActStats.load(args.stats) if args.stats else None
    use_data = stats is None or config.alpha == "auto"  # with --stats, --data only feeds alpha=auto
    data = _texts_or_path(args.data, args.text_field, "--data") if use_data else None
    tokenizer = _load_tokenizer(args.tokenizer or args.model,
                                required=args.tokenizer is not None or (use_data and _is_text_file(args.data)))
    model = _load_model(args.model, args.device, args.dtype)
    if stats is None and args.save_stats:
        from .calibration import collect_act_stats
        stats = collect_act_stats(model, data, tokenizer, num_samples=config.num_samples, seq_len=config.seq_len,
                                  batch_size=config.batch_size, progress=config.progress,
                                  device=config.calibration_device)
        stats.save(args.save_stats)
        print(f"saved the calibration statistics to {args.save_stats}")
    report = smoothquant(model, data, config, tokenizer=tokenizer, stats=stats)
    save_quantized(model, args.out, max_shard_size=args.max_shard_size, progress=not args.no_progress)
    if tokenizer is not None:
        tokenizer.save_pretrained(args.out)
    smoothing_file = Path(args.out) / "sq_smoothing_report.json"
    if report.smoothing is not None:
        report.smoothing.save(smoothing_file)
    elif smoothing_file.is_file():  # left by an earlier run into this directory (--overwrite): it no longer applies
        smoothing_file.unlink()
    print(_cli_words(str(report)))
    print(f"saved the quantized model to {args.out}")
    if args.plot and not report.smoothing.vectors:
        warnings.warn(f"--plot {args.plot}: not written, no group was smoothed")
    elif args.plot:
        from .plots import plot_smoothing
        print(f"plotted the smoothing to {plot_smoothing(report.smoothing, args.plot)}")
    return 0


def cmd_eval(args) -> int:
    from . import evaluation as ev
    from .calibration import check_positive_int
    if not (args.ppl or args.lambada or args.sqnr_data):
        raise ValueError("nothing to evaluate: pass --ppl FILE, --lambada FILE, or --reference DIR with "
                         "--sqnr-data FILE")
    if args.sqnr_data and not args.reference:
        raise ValueError("--sqnr-data compares each layer with the floating-point model: pass it as --reference DIR")
    for name in ("max_windows", "max_samples", "stride", "seq_len", "sqnr_samples"):
        if getattr(args, name) is not None:
            check_positive_int(name, getattr(args, name))
    _check_writable_file(args.json, "--json", args.overwrite)
    if args.plot and not args.sqnr_data:
        raise ValueError("--plot draws the per-layer SQNR report: pass --reference DIR and --sqnr-data FILE too")
    _check_plot_file(args.plot, "--plot", args.overwrite)
    _check_device(args.device)
    from .calibration import is_json_file
    if args.text_field and not any(p and is_json_file(p) for p in (args.ppl, args.lambada, args.sqnr_data)):
        raise ValueError(f"--text-field {args.text_field} applies to .jsonl / .json files, and none of --ppl, "
                         "--lambada, --sqnr-data is one")
    if args.reference:
        _check_floating_point_model(args.reference, "--reference", "the comparison")
    _check_model_dir(args.model, "MODEL")
    if args.sqnr_data and _model_kind(args.model) is None:
        raise ValueError(f"MODEL {args.model} is not a quantized checkpoint: the per-layer SQNR (--sqnr-data) compares "
                         f"a quantized model with its floating-point --reference")
    _check_outputs(args, [("--json", args.json), ("--plot", args.plot)],
                   [("MODEL", args.model), ("--reference", args.reference), ("--tokenizer", args.tokenizer)],
                   [("--ppl", args.ppl), ("--lambada", args.lambada), ("--sqnr-data", args.sqnr_data)])
    for flag, path in (("--ppl", args.ppl), ("--lambada", args.lambada), ("--sqnr-data", args.sqnr_data)):
        _check_data_file(path, flag)
    _check_tokenizer_dir(args.tokenizer)

    def read(path, flag):
        return _texts_or_path(path, args.text_field if path and is_json_file(path) else None, flag)
    ppl, lambada, sqnr_data = read(args.ppl, "--ppl"), read(args.lambada, "--lambada"), read(args.sqnr_data,
                                                                                               "--sqnr-data")
    tokenizer = _load_tokenizer(args.tokenizer or args.model, required=True)
    model = _load_model(args.model, args.device, args.dtype)
    reference = _load_model(args.reference, args.device, args.dtype) if args.reference else None
    progress = not args.no_progress
    results: dict = {"model": args.model}
    for label, m in (("model", model), ("reference", reference)):
        if m is None:
            continue
        if args.ppl:
            results[f"{label}_perplexity"] = ev.perplexity(m, ppl, tokenizer, seq_len=args.seq_len,
                                                            stride=args.stride, max_windows=args.max_windows,
                                                            progress=progress)
        if args.lambada:
            results[f"{label}_last_word_accuracy"] = ev.last_token_accuracy(m, lambada, tokenizer,
                                                                           max_samples=args.max_samples,
                                                                           progress=progress)
    if reference is not None and args.sqnr_data:
        report = ev.layer_sqnr(reference, model, sqnr_data, tokenizer, num_samples=args.sqnr_samples,
                               seq_len=args.seq_len, progress=progress)
        results["layer_sqnr_db"] = report
        print(ev.format_sqnr_table(report))
        if args.plot:
            from .plots import plot_layer_sqnr
            title = f"{args.model}: per-layer SQNR against {args.reference}"
            print(f"plotted the per-layer SQNR to {plot_layer_sqnr(report, args.plot, title=title)}")
    for key, value in results.items():
        if key != "layer_sqnr_db":
            print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")
    if args.json:
        ev.save_json(results, args.json)
    return 0


def cmd_export(args) -> int:
    from .checkpoint import load_quantized, parse_size
    from .export import export_compressed_tensors
    out = Path(args.out)
    if _inside(out.resolve(), Path(args.checkpoint).resolve()):
        raise ValueError(f"the output {args.out} is (inside) the checkpoint {args.checkpoint}: the export must go to a "
                         f"directory of its own")
    if out.is_file() or (out.is_dir() and any(out.iterdir())):
        raise ValueError(f"the output {args.out} is a file or a directory that is not empty; choose a new directory")
    limit = parse_size(args.max_shard_size, "--max-shard-size")
    model = load_quantized(args.checkpoint)
    export_compressed_tensors(model, out, tokenizer=_load_tokenizer(args.checkpoint, required=False),
                              max_shard_size=limit)
    print(f"exported {args.checkpoint} to {args.out} (compressed-tensors, int-quantized: "
          f"vllm serve {args.out})")
    return 0


def cmd_info(args) -> int:
    from .checkpoint import read_quantization_config, weights_files
    meta = read_quantization_config(args.checkpoint)
    if args.verify and args.json:  # the JSON is printed only for a checkpoint that passed
        from .checkpoint import load_quantized
        load_quantized(args.checkpoint)
    if args.json:  # machine-readable only, so that it can be piped (sq-kernels info DIR --json | jq ...)
        print(json.dumps(meta, indent=2))
        return 0
    schemes: dict[str, int] = {}
    for d in meta["modules"].values():
        key = f"{d['kind']}: w8 {d['weight']} / a8 {d['activation']}"
        schemes[key] = schemes.get(key, 0) + 1
    print(f"{args.checkpoint}: {meta['architecture']} ({meta.get('model_type')}), format {meta['format']} "
          f"v{meta['format_version']}, written by sq_kernels {meta.get('sq_kernels_version')}")
    files = weights_files(meta)
    sizes = [Path(args.checkpoint, name).stat().st_size if Path(args.checkpoint, name).is_file() else None
             for name, _ in files]
    total = "?" if None in sizes else _size(sum(sizes))
    print(f"  weights: {files[0][0]}" + (f" and {len(files) - 1} more shard(s)" if len(files) > 1 else "")
          + f", {total}" + (f" ({sizes.count(None)} missing)" if None in sizes else ""))
    for key, n in schemes.items():
        print(f"  {n} x {key}")
    quant = meta.get("quantization")
    kept = quant.get("kept") if isinstance(quant, dict) else None
    if isinstance(kept, dict) and kept:
        names = list(kept)
        print(f"  kept in floating point: {len(names)} ({', '.join(names[:4])}{', ...' if len(names) > 4 else ''})")
    try:
        stored = json.loads(Path(args.checkpoint, "config.json").read_text(encoding="utf-8"))
        dtype = stored.get("dtype") or stored.get("torch_dtype")
    except (OSError, ValueError):
        dtype = None
    if dtype:
        print(f"  floating-point rest stored as {dtype}")
    smoothing = quant.get("smoothing") if isinstance(quant, dict) else None
    alphas = smoothing.get("alphas") if isinstance(smoothing, dict) else None
    if isinstance(alphas, dict) and alphas:
        print("  alpha per layer: " + ", ".join(f"{k}={v:g}" if isinstance(v, (int, float)) else f"{k}={v}"
                                                for k, v in alphas.items()))
    if args.verify:
        from .checkpoint import load_quantized
        load_quantized(args.checkpoint)  # hashes, shapes, scales: raises CheckpointError naming what is wrong
        print("  verified: the weights load and match the table, config and hashes")
    return 0


BENCH_ARCHS = {  # real layer shapes (random weights: speed does not depend on the values)
    "llama-2-7b": ("llama", dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                                 num_key_value_heads=32, vocab_size=32000)),
    "llama-3-8b": ("llama", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                 num_key_value_heads=8, vocab_size=128256)),
    "opt-6.7b": ("opt", dict(hidden_size=4096, ffn_dim=16384, num_attention_heads=32, word_embed_proj_dim=4096,
                             vocab_size=50272)),
    "mistral-7b": ("mistral", dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, vocab_size=32000)),
    "tiny-llama": ("llama", dict(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=128)),  # a smoke test of the command
}


def _time_ms(fn, device, warmup: int, iters: int) -> float:
    """Median wall time of ``fn()`` in milliseconds (CUDA events on a GPU)."""
    import statistics
    import time

    import torch
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _graph_replay(fn):
    """``fn`` captured in a CUDA graph (warmed up on a side stream first); returns its replay, or raises
    if the call cannot be captured (a host synchronisation somewhere in the model)."""
    import torch
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def cmd_bench(args) -> int:
    import copy

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from .api import smoothquant
    from .calibration import check_positive_int
    _check_device(args.device)
    _check_writable_file(args.json, "--json", args.overwrite)
    for name in ("layers", "batch", "prompt", "iters"):
        check_positive_int(name, getattr(args, name))
    check_positive_int("warmup", args.warmup, minimum=0)
    quant_config = _config_from_args(args)  # a bad --alpha fails now, not after a 7B model was built
    if args.prompt > 4096:
        raise ValueError(f"--prompt {args.prompt} exceeds the 4096 positions the benchmark models are built with")
    device, dtype = torch.device(args.device), _dtype(args.dtype) or torch.float16
    if device.type == "cpu":
        print("note: on the CPU both models run PyTorch code (the W8A8 one through the reference ops, which "
              "emulate the kernels): the times say nothing about the CUDA kernels. Use --device cuda on a GPU.",
              flush=True)
    family, shape = BENCH_ARCHS[args.arch]
    config = AutoConfig.for_model(family, num_hidden_layers=args.layers, max_position_embeddings=4096, **shape)
    torch.manual_seed(0)
    with torch.device(device):
        fp = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    q = copy.deepcopy(fp)
    calib = torch.randint(0, config.vocab_size, (4, 128), device=device)
    report = smoothquant(q, calib, quant_config)
    rows, notes = [], []
    graphs = device.type == "cuda" and not args.eager
    from tqdm.auto import tqdm
    bar = tqdm(total=2 * 2 * (2 if graphs else 1), desc="timing", unit="run", disable=args.no_progress)
    for label, tokens in (("prefill", args.prompt), ("one token", 1)):
        x = torch.randint(0, config.vocab_size, (args.batch, tokens), device=device)
        row = {"phase": label, "M": args.batch * tokens}
        with torch.no_grad():
            for name, m in (("fp", fp), ("w8a8", q)):
                # logits of the last position only, as generation computes them after a prefill
                def call(m=m):
                    return m(input_ids=x, use_cache=False, logits_to_keep=1)
                bar.set_postfix_str(f"{label}, {name}")
                row[f"{name}_ms"] = _time_ms(call, device, args.warmup, args.iters)
                bar.update()
                if graphs:  # replayed as one CUDA graph: no Python or launch overhead, as a serving engine runs
                    try:
                        row[f"{name}_graph_ms"] = _time_ms(_graph_replay(call), device, args.warmup, args.iters)
                    except Exception as exc:  # noqa: BLE001 - any capture failure: report it, keep the eager time
                        notes.append(f"{label} {name}: CUDA graph capture failed ({str(exc).splitlines()[0]})")
                    bar.update()
        row["speedup"] = row["fp_ms"] / row["w8a8_ms"]
        if "fp_graph_ms" in row and "w8a8_graph_ms" in row:
            row["graph_speedup"] = row["fp_graph_ms"] / row["w8a8_graph_ms"]
        rows.append(row)
    bar.close()
    result = {"arch": args.arch, "layers": args.layers, "batch": args.batch, "prompt": args.prompt,
              "dtype": str(dtype), "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "converted": len(report.converted), "fp_bytes": _model_bytes(fp), "w8a8_bytes": _model_bytes(q),
              "rows": rows, "notes": notes}
    print(f"{args.arch}, {args.layers} decoder layers, batch {args.batch}, {result['device']}, {dtype}; "
          f"{len(report.converted)} linears W8A8 (lm_head and embeddings stay {dtype})")
    print(f"{'phase':<10} {'M':>6} {'FP ms':>9} {'W8A8 ms':>9} {'speedup':>8}"
          + (f" {'FP graph':>9} {'W8A8 graph':>10} {'speedup':>8}" if graphs else ""))
    for r in rows:
        line = f"{r['phase']:<10} {r['M']:>6} {r['fp_ms']:>9.3f} {r['w8a8_ms']:>9.3f} {r['speedup']:>7.2f}x"
        if "graph_speedup" in r:
            line += f" {r['fp_graph_ms']:>9.3f} {r['w8a8_graph_ms']:>10.3f} {r['graph_speedup']:>7.2f}x"
        print(line)
    for note in notes:
        print("note: " + note)
    print(f"memory: FP {_size(result['fp_bytes'])}, W8A8 {_size(result['w8a8_bytes'])} "
          f"({result['w8a8_bytes'] / max(1, result['fp_bytes']):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


SHARD_SIZE_HELP = "split the weights into files of at most this size (default 5GB; e.g. 2GB, 500MB, 10GiB)"
TEXT_FIELD_HELP = ("the JSON key holding each text in .jsonl / .json data files (default: text; lines that are "
                   "plain JSON strings are read as they are)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sq-kernels", description="SmoothQuant W8A8: calibrate, quantize, evaluate.")
    parser.add_argument("--version", action="version", version=f"sq-kernels {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p, data_required: bool):
        p.add_argument("--data", required=data_required,
                       help="calibration data: a local .txt, .jsonl ({'text': ...} per line) or .json file"
                            + ("" if data_required else "; not needed with --stats (unless --alpha auto)"))
        p.add_argument("--text-field", help=TEXT_FIELD_HELP)
        p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
        p.add_argument("--num-samples", type=int, default=128, help="calibration samples (default 128)")
        p.add_argument("--seq-len", type=int, default=512, help="tokens per sample (default 512)")
        p.add_argument("--batch-size", type=int, default=1, help="samples per forward pass (default 1)")
        p.add_argument("--calib-device", help="run calibration (and --alpha auto) here (default: --device); with "
                                              "--device cpu --calib-device cuda, a model larger than the GPU is "
                                              "calibrated on the GPU one decoder layer at a time")

    def runtime(p):
        p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
        p.add_argument("--dtype", default="auto", choices=DTYPES,
                       help="floating-point dtype to run in (default auto: the model's own; bench: float16)")
        p.add_argument("--no-progress", action="store_true", help="no progress bars")

    p = sub.add_parser("calibrate", help="collect per-channel activation statistics to a file")
    p.add_argument("model", help="local Hugging Face model directory")
    common(p, True)
    p.add_argument("--out", required=True, help="statistics file to write (.safetensors)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    runtime(p)
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("quantize", help="calibrate, smooth and quantize a model; save the W8A8 checkpoint")
    p.add_argument("model", help="local Hugging Face model directory")
    p.add_argument("out", help="output directory (new or empty; never the model's own)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing outputs: an earlier quantized checkpoint in OUT, the --save-stats file")
    common(p, False)
    p.add_argument("--alpha", help="migration strength in [0, 1], or 'auto' (default: the family's)")
    p.add_argument("--scheme", default="W8A8", choices=("W8A8", "O1", "O2", "O3"),
                   help="W8A8: per-channel weights, per-token dynamic activations (default); O1-O3: the paper's "
                        "per-tensor schemes (O3: static activation scales)")
    p.add_argument("--weight", choices=("per_channel", "per_tensor"), help="override the scheme's weight granularity")
    p.add_argument("--activation", choices=("per_token", "per_tensor", "static"), help="override the activation scheme")
    p.add_argument("--include", action="append", default=[],
                   help="only quantize modules whose name matches this fnmatch pattern (repeatable)")
    p.add_argument("--exclude", action="append", default=[],
                   help="keep modules matching this fnmatch pattern in floating point (repeatable; lm_head always "
                        "is, unless --quantize-lm-head)")
    p.add_argument("--quantize-lm-head", action="store_true",
                   help="quantize lm_head too (W8A8, not smoothed): halves its bytes, which matters in decoding with "
                        "a large vocabulary; check the accuracy with sq-kernels eval. Not exportable to "
                        "compressed-tensors")
    p.add_argument("--fp", action="append", default=[], help="set_local(PATTERN, 'fp'): a name pattern or class name")
    p.add_argument("--no-smooth", action="store_true", help="quantize without smoothing (naive W8A8)")
    p.add_argument("--family", choices=["auto"],
                   help="auto: infer the smoothing table from the model (for architectures without one)")
    p.add_argument("--fold-linear-pairs", action="store_true", help="also smooth v->o, up->down, fc1->fc2")
    p.add_argument("--stats", help="use statistics from this file instead of calibrating")
    p.add_argument("--save-stats", help="also write the calibration statistics to this file")
    p.add_argument("--max-shard-size", default="5GB", help=SHARD_SIZE_HELP)
    p.add_argument("--plot", help="also draw what smoothing did to this file (.png/.pdf/.svg; needs matplotlib): "
                                  "each group's activation and weight outliers before and after, and the channels "
                                  "of the worst groups")
    runtime(p)
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("eval", help="perplexity, last-word accuracy and per-layer SQNR")
    p.add_argument("model", help="a quantized checkpoint or a floating-point model directory")
    p.add_argument("--reference", help="the floating-point model to compare with")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory)")
    p.add_argument("--ppl", help="local text file for perplexity")
    p.add_argument("--lambada", help="local JSONL file ({'text': ...} per line) for last-word accuracy")
    p.add_argument("--sqnr-data", help="local text file for the per-layer SQNR report (needs --reference)")
    p.add_argument("--sqnr-samples", type=int, default=8,
                   help="samples of --seq-len tokens the per-layer SQNR is measured on (default 8)")
    p.add_argument("--text-field", help=TEXT_FIELD_HELP)
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window / sample (default 512)")
    p.add_argument("--stride", type=int, help="sliding-window stride for perplexity (default: seq-len)")
    p.add_argument("--max-windows", type=int, help="evaluate at most this many perplexity windows")
    p.add_argument("--max-samples", type=int, help="evaluate at most this many --lambada lines")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="also draw the per-layer SQNR report to this file (.png/.pdf/.svg; needs "
                                  "matplotlib and --sqnr-data)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json or --plot file")
    runtime(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench", help="latency and memory of a real-size model (random weights): FP vs W8A8")
    p.add_argument("--arch", default="llama-2-7b", choices=sorted(BENCH_ARCHS))
    p.add_argument("--layers", type=int, default=4, help="decoder layers to build (default 4)")
    p.add_argument("--batch", type=int, default=1, help="sequences (default 1)")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens per sequence (default 512)")
    p.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    p.add_argument("--iters", type=int, default=20, help="timed calls; the median is reported (default 20)")
    p.add_argument("--eager", action="store_true", help="on a GPU, skip the CUDA-graph timings (eager calls only)")
    p.add_argument("--alpha", help="migration strength (default: the family's)")
    p.add_argument("--scheme", default="W8A8", choices=("W8A8", "O1", "O2", "O3"), help="as for quantize")
    p.add_argument("--weight", choices=("per_channel", "per_tensor"), help="as for quantize")
    p.add_argument("--activation", choices=("per_token", "per_tensor", "static"), help="as for quantize")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    runtime(p)
    p.set_defaults(func=cmd_bench, include=[], exclude=[], fp=[], no_smooth=False, fold_linear_pairs=False,
                   calib_device=None, family=None, quantize_lm_head=False,
                   num_samples=4, seq_len=128, batch_size=1)

    p = sub.add_parser("export", help="write a quantized checkpoint as compressed-tensors (vLLM's INT8 W8A8 format)")
    p.add_argument("checkpoint", help="a directory written by sq-kernels quantize (or save_quantized)")
    p.add_argument("out", help="output directory (new or empty)")
    p.add_argument("--max-shard-size", default="5GB", help=SHARD_SIZE_HELP)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="describe a quantized checkpoint")
    p.add_argument("checkpoint", help="a directory written by sq-kernels quantize (or save_quantized)")
    p.add_argument("--json", action="store_true", help="print only the whole quantization config, as JSON")
    p.add_argument("--verify", action="store_true",
                   help="also load the weights on the CPU and check them against the table and hashes")
    p.set_defaults(func=cmd_info)
    return parser


# API words in messages shared with the Python API, and the flags that mean the same on the command line
_API_TO_CLI = (("(smooth=False)", "(--no-smooth)"), ("pass tokenizer=", "pass --tokenizer DIR"),
               ("tokenizer=...", "--tokenizer DIR"), ("read_texts(path, field=...) or the CLI's --text-field",
                                                      "--text-field"))


# argument names of SmoothQuantConfig / collect_act_stats that are flags here
_ARG_TO_FLAG = {"num_samples": "--num-samples", "seq_len": "--seq-len", "batch_size": "--batch-size"}


def _cli_words(message: str) -> str:
    import re
    for api, cli in _API_TO_CLI:
        message = message.replace(api, cli)
    message = re.sub(r"\b(num_samples|seq_len|batch_size)( must\b)", lambda m: _ARG_TO_FLAG[m.group(1)] + m.group(2),
                     message)
    message = re.sub(r"^alpha must\b", "--alpha must", message)
    message = message.replace("Quantize it with smoothquant().", "Quantize it with sq-kernels quantize.")
    return re.sub(r"set_local\('([^']*)', 'fp'\)", r"--fp '\1'", message)


def main(argv: list[str] | None = None) -> int:
    import warnings
    parser = build_parser()
    args = parser.parse_args(argv)
    formatwarning = warnings.formatwarning
    # warnings are messages to the user here (too little data, a pattern that matches nothing), not to a
    # developer: one line each, without the source location
    warnings.formatwarning = lambda message, category, *a, **k: f"sq-kernels {args.command}: warning: {message}\n"
    if getattr(args, "no_progress", False):  # transformers' own bars too ("Loading weights")
        from transformers.utils import logging as hf_logging
        hf_logging.disable_progress_bar()
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"sq-kernels {args.command}: error: {_cli_words(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outputs are written last; a checkpoint's sq_quantization.json is its last file
        print(f"sq-kernels {args.command}: interrupted before it finished; its outputs are absent or incomplete",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001  (a damaged model file raises the loader's own error types)
        if type(exc).__name__ != "SafetensorError":
            raise
        print(f"sq-kernels {args.command}: error: a weights file is corrupt or truncated: {exc}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = formatwarning


if __name__ == "__main__":
    sys.exit(main())
