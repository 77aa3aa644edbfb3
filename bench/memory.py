"""Peak memory of tune against mlx-lm's DWQ, on models shaped like real ones (one run):

- ours ÷ mlx-lm's DWQ online (its default: teacher and student in memory together), goal <= 0.6
- ours ÷ mlx-lm's DWQ offline (`--target-dir` + `--quantized-model`: only the student), <= 1.0
- ours at 1,024 tokens ÷ at 256 tokens, with tune.grad_checkpoint on, goal <= 1.5

The models are built in code from mlx-lm's classes with random weights and real dimensions (a
Qwen3-0.6B-shaped qwen3 and a small qwen3_moe with Qwen3's vocabulary), in float32: on this CPU
both sides compute in float32 through the same dequantize + BLAS kernel (mlx-lm's own
quantized_matmul would take hours here). Both sides get the same rows (our store's), batch,
sequence length and steps, and start from the same 4-bit student folder. Each measurement runs
in a fresh process: its peak RSS and MLX's peak memory over the whole process (loading
included). Then the memory model (`predicted_peak`) against every measured shape, and its
predictions for real models (the README's table).

Run: `make bench` or `.venv/bin/python -m bench.memory` (BENCH_SCALE=quick for a short check).
"""

from __future__ import annotations

import contextlib
import io
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import FullTime, Ratio, by_scale, report, report_details, wide_console

BITS, GROUP_SIZE, TOP_K, SEED = 4, 64, 1024, 123
STEPS, BATCH = by_scale(2, 1), 1  # full: the peak comes in the first step
SHORT, LONG = by_scale((64, 256), (256, 1024))  # tokens per row

_QWEN3_COMMON = {
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "max_position_embeddings": 40960,
    "torch_dtype": "float32",
}
QWEN3_0_6B = {
    "model_type": "qwen3",
    "hidden_size": 1024,
    "num_hidden_layers": 28,
    "intermediate_size": 3072,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    **_QWEN3_COMMON,
}
# config.json dimensions of the measured models: Qwen3-0.6B's own (its vocabulary, 28 layers
# of width 1024) and a small qwen3_moe with Qwen3's vocabulary; quick: narrow stand-ins.
QUICK_MODELS = {
    "qwen3 (small)": {
        "model_type": "qwen3",
        "hidden_size": 256,
        "num_hidden_layers": 4,
        "intermediate_size": 768,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 49152,  # the tokenizer's
        "tie_word_embeddings": True,
        **_QWEN3_COMMON,
    },
    "qwen3_moe (small)": {
        "model_type": "qwen3_moe",
        "hidden_size": 256,
        "num_hidden_layers": 2,
        "intermediate_size": 768,
        "moe_intermediate_size": 128,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 49152,  # the tokenizer's
        "tie_word_embeddings": False,
        **_QWEN3_COMMON,
    },
}
FULL_MODELS = {
    "Qwen3-0.6B": QWEN3_0_6B,
    "qwen3_moe (small)": {
        "model_type": "qwen3_moe",
        "hidden_size": 512,
        "num_hidden_layers": 4,
        "intermediate_size": 1536,
        "moe_intermediate_size": 256,
        "num_experts": 32,
        "num_experts_per_tok": 4,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "num_attention_heads": 8,
        "num_key_value_heads": 4,
        "head_dim": 64,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
        **_QWEN3_COMMON,
    },
}
MEASURED = by_scale(QUICK_MODELS, FULL_MODELS)


# ---- building the models, the student and the stores ---------------------------------------


def build_model_folder(folder: Path, config: dict) -> Path:
    """Random weights of `config`'s architecture saved as an mlx-lm folder, with the default
    teacher's tokenizer (a real byte-level BPE; the model's vocabulary may be wider)."""
    import importlib

    import mlx.core as mx
    from mlx_lm.utils import save_config, save_model

    from stages.models import resolve_model_path

    folder.mkdir(parents=True)
    module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    mx.random.seed(SEED)
    model = module.Model(module.ModelArgs.from_dict(config))
    # mlx's default init gives norms of 1 and uniform weights of width 1/sqrt(fan-in): logits
    # far flatter than a trained model's, which changes nothing that memory depends on.
    mx.eval(model.parameters())
    save_model(folder, model)
    save_config(config, folder / "config.json")
    tokenizer = Path(resolve_model_path("default"))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer / name, folder / name)
    return folder


def save_student(teacher: Path, folder: Path) -> Path:
    """The teacher quantized round-to-nearest (mlx-lm's quantize_model), saved as a folder."""
    from mlx_lm.utils import load, quantize_model, save

    model, tokenizer, config = load(str(teacher), return_config=True)
    with contextlib.redirect_stdout(io.StringIO()):
        _, config = quantize_model(model, config, group_size=GROUP_SIZE, bits=BITS)
    save(folder, str(teacher), model, tokenizer, config)
    return folder


def make_store(teacher: Path, path: Path, seq_len: int) -> Path:
    """Our targets over STEPS x BATCH training rows and one validation row of seq_len inputs."""
    from stages.targets import TargetsConfig, compute_targets

    config = TargetsConfig(
        teacher=str(teacher),
        store=str(path),
        top_k=TOP_K,
        tail_samples=0,  # mlx-lm's format on both sides (our default k=16 + 64 samples is smaller)
        max_seq_length=seq_len + 1,  # the teacher sees tokens[:, :-1]
        num_samples=STEPS * BATCH,
        num_valid_samples=1,
        batch_size=1,
        chunk_size=1,
    )
    compute_targets(config)
    return path


def store_rows(store: Path, split: str) -> list[tuple[list[int], int]]:
    """The store's token rows as mlx-lm's DWQ takes its data: (tokens, prompt offset)."""
    from store.reader import StoreReader

    tokens = StoreReader(store).sequences(split)["tokens"]
    return [(row.tolist(), 0) for row in tokens]


# ---- the measured runs, each in a fresh process ---------------------------------------------


def run_ours(job: dict) -> None:
    from stages.tune import TuneConfig, tune

    config = TuneConfig(
        store=job["store"],
        run_dir=job["run_dir"],
        student=job["student"],
        batch_size=BATCH,
        max_steps=STEPS,
        warmup_steps=0,
        val_every=10**6,
        checkpoint_every=10**6,
        grad_checkpoint=job["grad_checkpoint"],
    )
    with contextlib.redirect_stdout(io.StringIO()):
        tune(config)


def _mlx_lm_dwq(student, target_fn, job: dict) -> None:
    """mlx-lm's dwq_quantize as its main calls it (Adam with bias correction, its defaults),
    the student on the same dequantize + BLAS kernel as ours and in its own float32."""
    import mlx.core as mx
    import mlx.optimizers as optim
    from mlx_lm.quant.dwq import dwq_quantize

    from stages.models import use_dequantized_matmul

    use_dequantized_matmul(student)
    train, valid = store_rows(Path(job["store"]), "train"), store_rows(Path(job["store"]), "valid")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        dwq_quantize(
            student,
            target_fn,
            optim.Adam(learning_rate=1e-6, bias_correction=True),
            train,
            valid,
            BATCH,
            job["seq_len"] + 1,
            SEED,
            dtype=mx.float32,
            gradient_checkpoint=job["grad_checkpoint"],
        )


def run_mlx_lm_online(job: dict) -> None:
    """Teacher loaded, the student a quantized deep copy of it, targets from the teacher live."""
    import copy

    from mlx_lm.utils import load, quantize_model

    teacher, _, config = load(job["teacher"], return_config=True, lazy=True)
    student = copy.deepcopy(teacher)
    with contextlib.redirect_stdout(io.StringIO()):
        quantize_model(student, config, group_size=GROUP_SIZE, bits=BITS)
    _mlx_lm_dwq(student, lambda batch, idx, split: teacher(batch), job)


def run_mlx_lm_targets(job: dict) -> None:
    """Not measured: mlx-lm's own offline targets (`--target-dir`), from the teacher."""
    from mlx_lm.quant.dwq import compute_dwq_targets
    from mlx_lm.utils import load

    teacher = load(job["teacher"], lazy=True)[0]
    store = Path(job["store"])
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        compute_dwq_targets(
            teacher,
            Path(job["target_dir"]),
            store_rows(store, "train"),
            store_rows(store, "valid"),
            BATCH,
            job["seq_len"] + 1,
            SEED,
        )


def run_mlx_lm_offline(job: dict) -> None:
    """`--quantized-model` with `--target-dir`: the student alone, targets read per batch."""
    import mlx.core as mx
    from mlx_lm.utils import load

    student = load(job["student"], lazy=True)[0]
    target_dir = Path(job["target_dir"])

    def target_fn(_, idx, split):
        targets = mx.load(str(target_dir / split / f"{idx:010d}.safetensors"))
        return targets["logits"], targets["indices"]

    _mlx_lm_dwq(student, target_fn, job)


RUNS = {
    "ours": run_ours,
    "mlx-lm online": run_mlx_lm_online,
    "mlx-lm targets": run_mlx_lm_targets,
    "mlx-lm offline": run_mlx_lm_offline,
}


def measure(kind: str, **job) -> dict:
    """Run `kind` in a fresh process: its peak RSS and MLX peak memory (GB) and seconds."""
    tic = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bench.memory", kind, json.dumps(job)],
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {**result, "seconds": time.perf_counter() - tic}


def _child(kind: str, job: str) -> None:
    import mlx.core as mx

    RUNS[kind](json.loads(job))
    print(json.dumps({"rss_gb": peak_rss() / 1e9, "mlx_gb": mx.get_peak_memory() / 1e9}))


def peak_rss() -> int:
    """This process's peak resident bytes. On Linux VmHWM (of this program's image: ru_maxrss
    also counts the parent's memory that the fork copied before exec), else ru_maxrss."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # bytes on macOS
    line = next(line for line in status.splitlines() if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


# ---- the memory model ---------------------------------------------------------------------


@dataclass(frozen=True)
class Shape:
    """What peak memory depends on, from a config.json."""

    hidden: int
    layers: int
    vocab: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int  # dense MLP width (0: every layer is mixture-of-experts)
    experts: int = 0
    active_experts: int = 0
    expert_intermediate: int = 0
    tied: bool = True

    @classmethod
    def of(cls, config: dict) -> Shape:
        moe = config.get("num_experts", 0) > 0
        return cls(
            hidden=config["hidden_size"],
            layers=config["num_hidden_layers"],
            vocab=config["vocab_size"],
            heads=config["num_attention_heads"],
            kv_heads=config["num_key_value_heads"],
            head_dim=config.get("head_dim")
            or config["hidden_size"] // config["num_attention_heads"],
            intermediate=0 if moe else config["intermediate_size"],
            experts=config.get("num_experts", 0),
            active_experts=config.get("num_experts_per_tok", 0),
            expert_intermediate=config.get("moe_intermediate_size", 0),
            tied=config.get("tie_word_embeddings", False),
        )

    @property
    def block_weights(self) -> int:
        """Quantized weights of one transformer block: attention, MLP or every expert, router."""
        attention = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        mlp = 3 * self.hidden * self.intermediate
        experts = 3 * self.experts * self.hidden * self.expert_intermediate
        return attention + mlp + experts + self.experts * self.hidden

    @property
    def quantized_weights(self) -> int:
        head = 0 if self.tied else self.vocab * self.hidden
        return self.layers * self.block_weights + self.vocab * self.hidden + head

    def block_activations(self, tokens: int) -> int:
        """Values per token one block keeps for its backward pass besides attention matrices:
        its input and normed copies, q/k/v/attention output, the MLP's (or the active experts')
        three intermediate vectors."""
        width = self.intermediate or self.active_experts * self.expert_intermediate
        attention_values = self.head_dim * (2 * self.heads + 2 * self.kv_heads)
        return tokens * (4 * self.hidden + attention_values + 3 * width)


# Measured, not derived (one step of 4-layer qwen3 and qwen3_moe models, widths 256 and 512,
# vocabularies 49,152-151,936, 256 and 1,024 tokens): the float32 logits are held 2 times at the
# peak behind a tied head (embeddings as the output layer) and 4 times behind an untied one,
# which also keeps one more float32 copy of its dequantized weight; one attention matrix (batch
# x heads x tokens x tokens) is held once; without checkpointing each block keeps about 6 times
# the per-token values `Shape.block_activations` counts (the Qwen3-0.6B-shaped run). The rest is
# counted from the shapes.
LOGIT_COPIES = {True: 2, False: 4}  # by tied head
ATTENTION_COPIES, UNCHECKPOINTED_FACTOR = 1, 6
# With grad_checkpoint tune runs the output layer and loss by chunks of positions
# (stages/chunked_output.py): the head's weight (compute dtype) and its float32 gradient, and
# about this many float32 copies of one chunk's logits (measured, Qwen3-0.6B shape, 1x256:
# 0.18 GB above the student, the weight and its gradient, for chunks of 2^23 logits, 33 MB).
CHUNK_LOGIT_COPIES = 6


def logit_values(shape: Shape, batch: int, seq_len: int, grad_checkpoint: bool) -> int:
    """Logits held at once: the whole batch's, or with grad_checkpoint one chunk's."""
    from stages.chunked_output import LOGITS_PER_CHUNK

    positions = seq_len
    if grad_checkpoint:
        positions = min(seq_len, max(1, LOGITS_PER_CHUNK // (batch * shape.vocab)))
    return batch * positions * shape.vocab


def predicted_terms(
    shape: Shape,
    batch: int,
    seq_len: int,
    top_k: int = TOP_K,
    grad_checkpoint: bool = True,
    fast_path: bool = True,
    compute_bytes: int = 4,
    bits: int = BITS,
    group_size: int = GROUP_SIZE,
    moments_bytes: int = 4,
) -> dict[str, float]:
    """Predicted bytes at the peak of a tune step (MLX's accounting), per term:

    - the student: packed weights, scales and biases in the compute dtype;
    - trained state: the float32 master scales and biases, their gradient and Adam's 2 moments
      in `moments_bytes` each (at group size 64 and float32 moments 0.5 byte per weight: as
      much as the 4-bit weights themselves); the best parameters so far are on disk
      (run_dir.BEST_FILE), not in memory;
    - weights in the backward pass: with checkpointing the head's weight in the compute dtype
      and its float32 gradient (the output layer runs by chunks from its built weight); without
      it, on the CPU fast path (`fast_path`) the head's dequantized float32 weight kept for the
      backward pass and its float32 gradient (one more copy untied), and without the fast path
      (quantized_matmul) only its gradient in the compute dtype. On the fast path every
      quantized weight is dequantized to float32 in the forward: without checkpointing every
      block's are kept (for a mixture-of-experts model every expert's), with it one block's at
      a time with its gradient; off it one block's gradient in the compute dtype;
    - activations: with checkpointing one float32 hidden state per block and one block's
      internals recomputed at a time; without it every block's internals;
    - the logits, float32: LOGIT_COPIES of the whole batch's, or with checkpointing
      CHUNK_LOGIT_COPIES of one chunk's; the decoded targets (top-k logits and indices,
      float32/int32) of the batch in use and the two prefetched.
    """
    tokens = batch * seq_len
    weights = shape.quantized_weights
    groups = weights / group_size
    student = weights * bits / 8 + 2 * groups * compute_bytes
    trained = 2 * groups * (4 + 4 + 2 * moments_bytes)
    head, block = shape.vocab * shape.hidden, shape.block_weights
    if grad_checkpoint:
        kept_head = (compute_bytes + 4) * head
    elif fast_path:
        kept_head = (2 if shape.tied else 3) * 4 * head
    else:
        kept_head = compute_bytes * head
    if fast_path:
        kept_blocks = 4 * (2 * block if grad_checkpoint else (shape.layers + 1) * block)
    else:
        kept_blocks = compute_bytes * block
    attention = ATTENTION_COPIES * 4 * batch * shape.heads * seq_len * seq_len
    internals = 4 * shape.block_activations(tokens) + attention
    if grad_checkpoint:
        activations = 4 * shape.layers * tokens * shape.hidden + internals
    else:
        activations = shape.layers * (UNCHECKPOINTED_FACTOR * 4 * shape.block_activations(tokens))
    values = logit_values(shape, batch, seq_len, grad_checkpoint)
    copies = CHUNK_LOGIT_COPIES if grad_checkpoint else LOGIT_COPIES[shape.tied]
    logits = copies * 4 * values
    targets = 3 * tokens * top_k * 8
    return {
        "student": student,
        "trained": trained,
        "head weights": kept_head,
        "block weights": kept_blocks,
        "activations": activations,
        "logits": logits,
        "targets": targets,
    }


def predicted_peak(shape: Shape, batch: int, seq_len: int, **settings) -> float:
    """Predicted peak bytes of a tune step: the sum of `predicted_terms`; with grad_checkpoint
    the output layer's chunks (head weights, logits) and the blocks' backward pass (block
    weights, activations) run one after the other, and the larger of the two counts."""
    terms = predicted_terms(shape, batch, seq_len, **settings)
    if not settings.get("grad_checkpoint", True):
        return sum(terms.values())
    output_layer = terms.pop("head weights") + terms.pop("logits")
    blocks = terms.pop("block weights") + terms.pop("activations")
    return sum(terms.values()) + max(output_layer, blocks)


# Real models, their config.json dimensions (Hugging Face, Qwen/... and meta-llama/...).
REAL = {
    "Qwen3-0.6B": QWEN3_0_6B,
    "Llama-3.1-8B": {
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "vocab_size": 128256,
        "tie_word_embeddings": False,
    },
    "Qwen3-30B-A3B": {
        "hidden_size": 2048,
        "num_hidden_layers": 48,
        "intermediate_size": 6144,
        "moe_intermediate_size": 768,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_attention_heads": 32,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
    "Qwen3-235B-A22B": {
        "hidden_size": 4096,
        "num_hidden_layers": 94,
        "intermediate_size": 12288,
        "moe_intermediate_size": 1536,
        "num_experts": 128,
        "num_experts_per_tok": 8,
        "num_attention_heads": 64,
        "num_key_value_heads": 4,
        "head_dim": 128,
        "vocab_size": 151936,
        "tie_word_embeddings": False,
    },
}


# (batch, tokens per row) of the predictions: mlx-lm DWQ's defaults, and one row of them
PREDICTED_BATCHES = ((4, 1024), (1, 1024))


def prediction_table() -> list[dict]:
    """Predicted peaks (GB) of a checkpointed tune on the real models at 4-bit g64, k=1024: on a
    GPU (bfloat16, quantized_matmul) at each of PREDICTED_BATCHES with its terms, and on a CPU
    (float32, fast path) at mlx-lm's defaults."""
    rows = []
    for name, config in REAL.items():
        shape = Shape.of(config)
        row: dict = {"model": name, "weights_b": shape.quantized_weights / 1e9}
        for batch, seq_len in PREDICTED_BATCHES:
            gpu = {"fast_path": False, "compute_bytes": 2}
            terms = predicted_terms(shape, batch, seq_len, **gpu)
            row[f"gpu_{batch}x{seq_len}_gb"] = predicted_peak(shape, batch, seq_len, **gpu) / 1e9
            row[f"gpu_{batch}x{seq_len}_terms_gb"] = {k: v / 1e9 for k, v in terms.items()}
        small = {**gpu, "moments_bytes": 2}
        row["gpu_1x1024_bf16_moments_gb"] = predicted_peak(shape, 1, 1024, **small) / 1e9
        smaller = {**small, "group_size": 128}
        row["gpu_1x1024_bf16_moments_g128_gb"] = predicted_peak(shape, 1, 1024, **smaller) / 1e9
        row["cpu_4x1024_gb"] = predicted_peak(shape, 4, 1024, fast_path=True) / 1e9
        rows.append(row)
    return rows


TERMS_SHOWN = ("student", "trained", "logits")


def print_predictions() -> None:
    from rich.table import Table

    table = Table(title="predicted peak GB of a checkpointed tune (4-bit g64, k=1024)")
    columns = ["model", "weights (B)"]
    columns += [f"GPU bf16 {b}x{n}" for b, n in PREDICTED_BATCHES]
    columns += ["GPU bf16 1x1024, bf16 moments", "the same at g128", "CPU float32 4x1024"]
    columns += [f"of which at 1x1024: {term}" for term in TERMS_SHOWN]
    for column in columns:
        table.add_column(column, justify="right")
    for row in prediction_table():
        terms = row["gpu_1x1024_terms_gb"]
        gpu = [f"{row[f'gpu_{b}x{n}_gb']:.1f}" for b, n in PREDICTED_BATCHES]
        parts = [f"{terms[t]:.1f}" for t in TERMS_SHOWN]
        gpu.append(f"{row['gpu_1x1024_bf16_moments_gb']:.1f}")
        gpu.append(f"{row['gpu_1x1024_bf16_moments_g128_gb']:.1f}")
        cells = [row["model"], f"{row['weights_b']:.1f}", *gpu, f"{row['cpu_4x1024_gb']:.1f}"]
        table.add_row(*cells, *parts)
    wide_console().print(table)


# ---- the benchmark --------------------------------------------------------------------------


def measure_model(
    name: str, config: dict, tmp: Path, clock: FullTime, ours_only: bool = False
) -> list[dict]:
    """Every run of one model: ours (checkpointed, short and long; short unchecked), mlx-lm
    online and offline at the short length (not with `ours_only`). Returns one row per run."""
    full = list(FULL_MODELS.values())[list(MEASURED).index(name)]
    teacher = build_model_folder(tmp / "teacher", config)
    student = save_student(teacher, tmp / "student")
    rows = []
    for seq_len in (SHORT, LONG):
        store = make_store(teacher, tmp / f"store-{seq_len}.zarr", seq_len)
        job = {"store": str(store), "student": str(student), "seq_len": seq_len}
        job["teacher"], job["target_dir"] = str(teacher), str(tmp / f"mlx-targets-{seq_len}")
        runs = [("ours", True)]
        if seq_len == SHORT and not ours_only:
            runs += [("ours", False), ("mlx-lm online", False), ("mlx-lm targets", False)]
            runs += [("mlx-lm offline", False), ("mlx-lm offline", True)]
        full_len = {SHORT: 256, LONG: 1024}[seq_len]
        for kind, checkpointed in runs:
            run_dir = tmp / f"run-{seq_len}-{kind.replace(' ', '-')}-{checkpointed}"
            result = measure(kind, **job, run_dir=str(run_dir), grad_checkpoint=checkpointed)
            clock.add(result["seconds"], work(config, seq_len), work(full, full_len))
            row = {"model": name, "run": kind, "tokens": seq_len, "checkpoint": checkpointed}
            row["predicted_gb"] = None
            if kind == "ours":
                predicted = predicted_peak(
                    Shape.of(config), BATCH, seq_len, grad_checkpoint=checkpointed
                )
                row["predicted_gb"] = predicted / 1e9
            rows.append({**row, **result})
    return rows


def work(config: dict, seq_len: int) -> float:
    """What a run's time grows with (for the quick run's estimate of the full one)."""
    return Shape.of(config).quantized_weights * seq_len


def print_runs(rows: list[dict]) -> None:
    from rich.table import Table

    table = Table(title=f"peak memory per run (batch {BATCH}, {STEPS} steps, 4-bit g64, k={TOP_K})")
    for column in ("model", "run", "tokens", "checkpoint", "MLX peak GB", "predicted GB"):
        table.add_column(column, justify="right")
    table.add_column("peak RSS GB", justify="right")
    table.add_column("s", justify="right")
    for r in rows:
        if r["run"] == "mlx-lm targets":
            continue
        predicted = f"{r['predicted_gb']:.3f}" if r["predicted_gb"] is not None else ""
        table.add_row(
            r["model"],
            r["run"],
            str(r["tokens"]),
            "on" if r["checkpoint"] else "off",
            f"{r['mlx_gb']:.3f}",
            predicted,
            f"{r['rss_gb']:.3f}",
            f"{r['seconds']:.0f}",
        )
    wide_console().print(table)


def ratios(rows: list[dict]) -> list[Ratio]:
    """Per model, on MLX's peak and on the peak RSS: ours (checkpointed) vs mlx-lm online and
    offline at the short length, and ours at the long length vs the short one."""

    def peak(model: str, run: str, tokens: int, measure: str, checkpoint: bool = False) -> float:
        wanted = (model, run, tokens, checkpoint)
        match = [r for r in rows if (r["model"], r["run"], r["tokens"], r["checkpoint"]) == wanted]
        return match[0][measure]  # ours checkpointed, mlx-lm at its default unless asked

    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        theirs_measured = any(r["run"] != "ours" for r in rows if r["model"] == model)
        for measure, label in (("mlx_gb", "MLX peak GB"), ("rss_gb", "peak RSS GB")):
            ours = peak(model, "ours", SHORT, measure, True)
            long = peak(model, "ours", LONG, measure, True)
            what = f"{label} at {LONG} vs {SHORT} tokens, {model}"
            out.append(Ratio("memory", what, ours, long, "<= 1.5"))
            if not theirs_measured:
                continue
            at = f"{model}, {BATCH}x{SHORT}"
            for run, goal in (("mlx-lm online", "<= 0.6"), ("mlx-lm offline", "<= 1.0")):
                theirs = peak(model, run, SHORT, measure)
                out.append(Ratio("memory", f"{label} vs {run}, {at}", theirs, ours, goal))
            theirs = peak(model, "mlx-lm offline", SHORT, measure, True)
            what = f"{label} vs mlx-lm offline --grad-checkpoint, {at}"
            out.append(Ratio("memory", what, theirs, ours, "<= 1.0"))
    return out


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="peak memory of tune against mlx-lm's DWQ")
    parser.add_argument(
        "--ours-only",
        action="store_true",
        help="only our checkpointed runs, short and long (mlx-lm's figures unchanged)",
    )
    args = parser.parse_args(argv)
    clock = FullTime("memory")
    rows = []
    for name, config in MEASURED.items():
        with tempfile.TemporaryDirectory() as tmp:
            rows += measure_model(name, config, Path(tmp), clock, args.ours_only)
    print_runs(rows)
    print_predictions()
    report(f"memory: tune vs mlx-lm's DWQ (one run; batch {BATCH}, {STEPS} steps)", ratios(rows))
    report_details("memory", {"runs": rows, "predicted": prediction_table()})
    clock.write()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] in RUNS:
        _child(sys.argv[1], sys.argv[2])
    else:
        main()
