"""The bits-per-weight budget of `tune` (stages/bit_budget.py) on the tiny teacher: the mixed-bit
student saves and loads back with its per-layer bits, the mix meets and spends the budget, the
sensitivities rank a layer made fragile first, an unreachable budget is one line, resume is
exact."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from pipeline.config import load_config
from stages import bit_budget
from stages.bit_budget import Candidate, Layout, allocate, model_layout
from stages.errors import InvalidConfig, StageError
from stages.losses import kl_tail, tail_logsumexp
from stages.models import layer_quantization, load_model, quantize_student
from stages.tune import TuneConfig, _sensitivity_batches, tune
from store.reader import StoreReader
from tests import test_tune
from tests.conftest import cli_args, make_tiny_model_folder, run_cli
from tests.test_tune import (
    assert_kill_and_resume_is_bit_identical,
    make_tune_store,
    saved_weights,
    tune_config,
)

tiny_store = test_tune.tiny_store  # the store fixture of the tune tests
# The tiny teacher is float32, so at group size 32 a layer at b bits stores b + 2 bits per weight.
BUDGET = 5.5
SHORT = {"max_steps": 6, "epochs": 1}


@pytest.fixture(scope="module")
def budget_run(tiny_store, tmp_path_factory) -> Path:
    """A tuned student under the budget, from the GPTQ start (its own bits per layer)."""
    run_dir = tmp_path_factory.mktemp("budget") / "run"
    tune(tune_config(tiny_store, run_dir, bits_per_weight=BUDGET, init="gptq", **SHORT))
    return run_dir


def sensitivities(run_dir: Path) -> dict:
    return json.loads((run_dir / "sensitivities.json").read_text())


def chosen_bits(run_dir: Path) -> dict[str, int]:
    return {layer["path"]: layer["bits"] for layer in sensitivities(run_dir)["layers"]}


def chosen_options(run_dir: Path) -> dict[str, tuple[int, int]]:
    layers = sensitivities(run_dir)["layers"]
    return {layer["path"]: (layer["bits"], layer["group_size"]) for layer in layers}


def test_a_mixed_bit_student_loads_back_bit_exactly_with_its_per_layer_bits(budget_run):
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import compute_bits_per_weight

    chosen = chosen_bits(budget_run)
    assert len(set(chosen.values())) > 1, "the budget chose one width for every layer"
    config = json.loads((budget_run / "model" / "config.json").read_text())
    entries = layer_quantization(config, "tuned")
    assert {path: entry["bits"] for path, entry in entries.items()} == chosen
    model, _ = mlx_load(str(budget_run / "model"))
    modules = dict(model.named_modules())
    assert {path: modules[path].bits for path in chosen} == chosen
    saved = saved_weights(budget_run / "model")
    loaded = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    assert loaded.keys() == saved.keys()
    assert all(
        loaded[k].dtype == saved[k].dtype and np.array_equal(loaded[k], saved[k]) for k in saved
    )
    # The record's bits per weight is mlx-lm's measure of the saved model, within the budget.
    stored = compute_bits_per_weight(model)
    assert stored == pytest.approx(sensitivities(budget_run)["bits_per_weight"], rel=1e-9)
    assert stored <= BUDGET


def test_the_chosen_mix_spends_the_budget(budget_run, tiny_teacher):
    """Within the budget, and no layer can take any dearer allowed option (bits and group size)
    of a lower estimate without exceeding it."""
    layout = model_layout(load_model(str(tiny_teacher)).model, group_size=32)
    chosen = chosen_options(budget_run)
    assert layout.bits_per_weight(chosen) <= BUDGET
    sizes = [32, 64, 128]  # the default tune.allowed_group_sizes
    for layer in sensitivities(budget_run)["layers"]:
        candidate = next(c for c in layout.candidates if c.path == layer["path"])
        now, estimate = chosen[candidate.path], layer["estimated_kl"]
        for option in candidate.options(bit_budget.DEFAULT_ALLOWED_BITS, sizes):
            dearer = candidate.stored_bits(*option) > candidate.stored_bits(*now)
            if (
                dearer
                and estimate[bit_budget.option_label(option, sizes)] < estimate[layer["choice"]]
            ):
                assert layout.bits_per_weight({**chosen, candidate.path: option}) > BUDGET


def test_a_gptq_start_weighs_each_layer_by_what_gptq_leaves_of_its_error(
    budget_run, tiny_store, tiny_teacher, tmp_path_factory
):
    """A GPTQ student keeps far less of some layers' rounding error than of others': each
    layer's estimates are scaled by its share, from the full-precision teacher's inputs on
    GPTQ's calibration rows, which the record keeps; unless those rows hold too few tokens
    for the widest layer (the tests' usual store: 24 rows of 16), where GPTQ fits them and the
    share collapses, and the plain estimates choose."""
    from stages import gptq
    from stages.tune import MIN_TOKENS_PER_COLUMN, _calibration_batches

    def calibration(store: Path) -> list:
        return _calibration_batches(StoreReader(str(store)), tune_config(store, Path("unused")))

    model = load_model(str(tiny_teacher)).model
    widest = max(w.shape[-1] for _, w in tree_flatten(model.parameters()) if w.ndim == 2)
    tokens = lambda batches: sum(mask.sum().item() for _, mask in batches)  # noqa: E731
    assert tokens(calibration(tiny_store)) < MIN_TOKENS_PER_COLUMN * widest
    assert "gptq_error_ratio" not in sensitivities(budget_run)["layers"][0]

    roomy = make_tune_store(tiny_teacher, tmp_path_factory, num_samples=48)
    batches = calibration(roomy)
    assert tokens(batches) >= MIN_TOKENS_PER_COLUMN * widest
    run_dir = tmp_path_factory.mktemp("roomy") / "run"
    tune(tune_config(roomy, run_dir, bits_per_weight=BUDGET, init="gptq", **SHORT))
    record = sensitivities(run_dir)
    assert "gptq_error_ratio" in record["estimate"]
    hessians = dict(gptq.full_precision_hessians(model, batches))
    shares = {layer["path"]: layer["gptq_error_ratio"] for layer in record["layers"]}
    assert set(shares) == set(hessians)  # every Linear and the tied embedding (its head's inputs)
    for path, share in shares.items():
        assert 0 < share <= 1
        assert share == pytest.approx(gptq.output_error_ratio(hessians[path]), rel=1e-3), path
    assert max(shares.values()) > 1.5 * min(shares.values())  # they differ: the ranking moves


def test_a_layer_gptq_mostly_cancels_gets_fewer_bits_but_8_bits_is_not_discounted(
    tiny_store, tiny_teacher
):
    """The ratios scale each layer's estimates below 8 bits (GPTQ leaves an 8-bit layer
    rounded to nearest), and the allocation follows: the layer that got the most bits gets
    fewer once GPTQ is to leave 1 % of its error."""
    config = tune_config(tiny_store, Path("unused"))
    batches = list(_sensitivity_batches(config, StoreReader(str(tiny_store)), None))
    model = load_model(str(tiny_teacher)).model
    layout = model_layout(model, 32)
    allowed = bit_budget.DEFAULT_ALLOWED_BITS

    def choose(ratios=None):
        return bit_budget.choose_layer_bits(
            layout, model, batches, BUDGET, allowed, seed=0, error_ratios=ratios
        )

    plain_choice, plain = choose()
    favoured = max(plain_choice, key=lambda path: plain_choice[path][0])
    ratios = {path: 1.0 for path in plain_choice} | {favoured: 0.01}
    choice, record = choose(ratios)
    assert choice[favoured][0] < plain_choice[favoured][0]
    for before, after in zip(plain["layers"], record["layers"], strict=True):
        share = ratios[before["path"]]
        assert after["gptq_error_ratio"] == share
        for key, kl in before["estimated_kl"].items():
            expected = kl if key == "8" else kl * share
            assert after["estimated_kl"][key] == pytest.approx(expected, rel=1e-6)
    assert "gptq_error_ratio" not in plain["layers"][0]


def test_greedy_allocation_follows_the_estimates_and_fills_the_budget():
    layout = Layout(
        [Candidate(f"layer{i}", 4096, 16) for i in range(6)],
        group_size=64,
        fixed_bits=0,
        parameters=6 * 4096,
    )
    rng = np.random.default_rng(0)
    scale = rng.uniform(0.1, 10.0, size=6)
    estimates = {
        f"layer{i}": {(b, 64): float(scale[i] * 4.0**-b) for b in (2, 3, 4, 5, 6, 8)}
        for i in range(6)
    }
    for budget in (3.0, 4.5, 5.25, 7.0):
        choice = allocate(layout, estimates, [2, 3, 4, 5, 6, 8], budget)
        assert layout.bits_per_weight(choice) <= budget
        order = sorted(choice, key=lambda path: estimates[path][2, 64])  # least sensitive first
        assert [choice[p] for p in order] == sorted(choice[p] for p in order)


def test_an_unreachable_budget_is_one_line_naming_the_nearest(tiny_store, tiny_teacher, tmp_path):
    def tune_cli(budget: float):
        overrides = {"store": str(tiny_store), "tune.run_dir": str(tmp_path / "run")}
        overrides |= {"tune.group_size": 32, "tune.allowed_bits": "[3,4]"}
        overrides |= {"tune.allowed_group_sizes": "[32]"}  # the layout computed below
        return run_cli("tune", "--bits-per-weight", str(budget), *cli_args(overrides))

    layout = model_layout(load_model(str(tiny_teacher)).model, group_size=32)
    least, most = bit_budget.reachable(layout, [3, 4])
    # float32 scales and biases at group 32 add 2 bits, the float norms of a tiny model more
    assert 5.0 < least < 5.2 and 6.0 < most < 6.2
    for budget, words, nearest in ((1.0, "below", least), (9.0, "above", most)):
        result = tune_cli(budget)
        assert result.returncode == 2, result.stderr
        lines = (result.stdout + result.stderr).strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in result.stderr
        assert f"tune.bits_per_weight={budget} is {words}" in lines[0]
        named = float(lines[0].split(" is ", 2)[2].split()[0])
        assert named == pytest.approx(nearest, abs=1e-3)
    assert not (tmp_path / "run" / "checkpoint").exists()
    assert layout.bits_per_weight(layout.uniform(3)) == least  # what all-3-bit stores


def stored_kl(model, batches: list[tuple]) -> float:
    """KL(stored teacher || model) per position at T=1 over the top-k and the tail bucket."""
    total, positions = 0.0, 0.0
    for tokens, teacher_topk, indices, teacher_tail, *_, mask in batches:
        logits = model(tokens).astype(mx.float32)
        student_topk = mx.take_along_axis(logits, indices, axis=-1)
        student_tail = tail_logsumexp(logits, indices)
        kl = kl_tail(student_topk, student_tail, teacher_topk, teacher_tail, 1.0)
        total += (kl * mask).sum().item()
        positions += mask.sum().item()
    return total / positions


def test_the_estimates_rank_layers_as_their_measured_kl_does(tiny_store, tiny_teacher):
    """Each layer alone rounded to 3 bits: the KL to the stored targets it adds, measured, is
    ordered as the estimates order it (a random score has a rank correlation near 0; measured
    here 0.99) and close to it in nats."""
    reader = StoreReader(str(tiny_store))
    config = tune_config(tiny_store, Path("unused"))
    batches = list(_sensitivity_batches(config, reader, None))
    model = load_model(str(tiny_teacher)).model
    paths = [c.path for c in model_layout(model, 32).candidates]
    fishers, positions = bit_budget.fisher_diagonals(model, paths, batches, seed=0)
    options = {path: [(3, 32)] for path in paths}
    estimates = bit_budget.estimated_kl(model, fishers, positions, options)
    baseline = stored_kl(model, batches)  # the stored logits' rounding: not zero
    measured = {}
    for path in paths:
        alone = load_model(str(tiny_teacher)).model
        nn.quantize(alone, group_size=32, bits=3, class_predicate=lambda p, m, path=path: p == path)
        measured[path] = stored_kl(alone, batches) - baseline
    ranks = [
        np.argsort(np.argsort(v))
        for v in ([estimates[p][3, 32] for p in paths], [measured[p] for p in paths])
    ]
    rho = np.corrcoef(*ranks)[0, 1]  # Spearman's rank correlation
    assert rho > 0.8, (rho, estimates, measured)
    # and in nats: the second-order estimate is the measured KL to within a factor of 2
    assert all(0.5 < estimates[p][3, 32] / measured[p] < 2.0 for p in paths), (estimates, measured)


def test_a_layer_made_fragile_gets_more_bits(tmp_path_factory):
    """One MLP layer gets an outlier in every group, so rounding its other weights costs far
    more: against the same teacher without them, its estimates rise and it gets more bits."""
    from mlx_lm.utils import save_model

    fragile = "model.layers.0.mlp.up_proj"
    found = {}
    for name in ("plain", "fragile"):
        folder = make_tiny_model_folder(tmp_path_factory.mktemp(name) / "teacher", seed=1)
        if name == "fragile":
            loaded = load_model(str(folder))
            layer = dict(loaded.model.named_modules())[fragile]
            weight = np.array(layer.weight)
            weight[:, ::32] = 10.0 * np.abs(weight).max()  # one outlier per group of 32
            layer.weight = mx.array(weight)
            save_model(folder, loaded.model)
        store = make_tune_store(folder, tmp_path_factory)
        run_dir = tmp_path_factory.mktemp(f"{name}-run") / "run"
        bits_only = {"allowed_group_sizes": [32], "max_steps": 1, "epochs": 1}
        tune(tune_config(store, run_dir, bits_per_weight=BUDGET, **bits_only))
        found[name] = {layer["path"]: layer for layer in sensitivities(run_dir)["layers"]}
    plain, made = found["plain"][fragile], found["fragile"][fragile]
    assert made["bits"] > plain["bits"]
    assert all(made["estimated_kl"][b] > 3 * plain["estimated_kl"][b] for b in ("3", "4", "5"))


@pytest.mark.parametrize(
    "levers",
    [{}, {"init": "gptq", "learned_rounding": True}, {"allowed_group_sizes": [32, 64]}],
    ids=["rtn", "gptq+rounding", "group-sizes"],
)
def test_resume_with_a_budget_is_bit_identical(tiny_store, tmp_path, levers):
    assert_kill_and_resume_is_bit_identical(tiny_store, tmp_path, bits_per_weight=BUDGET, **levers)


def test_a_resumed_run_keeps_its_bits_and_refuses_another_budget(tiny_store, tmp_path):
    run_dir = tmp_path / "run"
    one_size = {"allowed_group_sizes": [32], "max_steps": 4, "epochs": 1}
    tune(tune_config(tiny_store, run_dir, bits_per_weight=BUDGET, **one_size))
    state = json.loads((run_dir / "checkpoint" / "state.json").read_text())
    assert state["layer_bits"] == chosen_bits(run_dir)  # bits alone, as before group sizes
    phases = []
    tune(
        tune_config(tiny_store, run_dir, bits_per_weight=BUDGET, **one_size),
        on_phase=phases.append,
    )
    assert not any("sensitivities" in phase for phase in phases)  # the recorded bits are used
    kept = (run_dir / "sensitivities.json").read_bytes()
    phases.clear()
    with pytest.raises(StageError, match="tune.bits_per_weight was 5.5, now 6.0"):
        other = tune_config(tiny_store, run_dir, bits_per_weight=6.0, **one_size)
        tune(other, on_phase=phases.append)
    assert (run_dir / "sensitivities.json").read_bytes() == kept  # the refused run wrote none
    assert phases == []  # refused before the teacher loads: no sensitivities measured for it
    # Its key is the one versions before group sizes wrote: today's default (every group size)
    # is another run, and the refusal names the setting that resumes it.
    resumes = "resumes with --set 'tune.allowed_group_sizes=[32]'"
    with pytest.raises(StageError, match=re.escape(resumes)):
        tune(tune_config(tiny_store, run_dir, bits_per_weight=BUDGET, max_steps=4, epochs=1))


def test_budget_settings_are_checked_and_keyed_only_when_set():
    plain = TuneConfig()
    assert "bits_per_weight" not in plain.identity() and "allowed_bits" not in plain.identity()
    assert TuneConfig(allowed_bits=[2, 8]).resume_key() == plain.resume_key()
    budget = TuneConfig(bits_per_weight=4.5)
    assert budget.identity()["bits_per_weight"] == 4.5
    assert budget.resume_key() != TuneConfig(bits_per_weight=4.5, allowed_bits=[3, 4]).resume_key()
    for bad, words in (
        ({"allowed_bits": [4, 7]}, "distinct values of 2, 3, 4, 5, 6, 8"),
        ({"allowed_bits": [4, 4]}, "distinct values"),
        ({"allowed_bits": [8]}, "a width below 8"),
        ({"bits_per_weight": 0.0}, "bits_per_weight must be > 0"),
        ({"bits_per_weight": 4.5, "student": "some/model"}, "leave tune.student unset"),
    ):
        with pytest.raises(InvalidConfig, match=words):
            TuneConfig(**bad)
    from_cli = load_config(None, {"tune.bits_per_weight": "4.5"}).tune
    assert from_cli.bits_per_weight == 4.5


def test_rtn_of_a_mixed_student_rebuilds_its_mix(budget_run, tiny_teacher):
    """eval's RTN row of a mixed student: the same per-layer bits from its config.json."""
    config = json.loads((budget_run / "model" / "config.json").read_text())
    rtn, rtn_config = quantize_student(
        load_model(str(tiny_teacher)), 4, 32, per_layer=layer_quantization(config, "tuned")
    )
    modules = dict(rtn.named_modules())
    assert {path: modules[path].bits for path in chosen_bits(budget_run)} == chosen_bits(budget_run)
    assert layer_quantization(rtn_config, "rtn") == layer_quantization(config, "tuned")


def test_report_plots_the_layer_sensitivities(budget_run):
    from pipeline.report import build_figure, summarize, write_report

    summary = summarize(budget_run)
    assert summary.sensitivities == sensitivities(budget_run)
    assert any(line.startswith(f"bits budget {BUDGET} per weight") for line in summary.lines())
    _, panel = build_figure(summary).axes
    labels = [text.get_text() for text in panel.get_legend().get_texts()]
    sizes = (32, 64, 128)  # the default tune.allowed_group_sizes
    options = [f"{b}-bit g{g}" for b in bit_budget.DEFAULT_ALLOWED_BITS for g in sizes]
    assert labels == [*options, "chosen"]
    chosen = panel.get_lines()[-1].get_ydata()
    layers = sensitivities(budget_run)["layers"]
    assert list(chosen) == [layer["estimated_kl"][layer["choice"]] for layer in layers]
    _, plot = write_report(budget_run)
    assert plot is not None and plot.stat().st_size > 0


def test_a_wider_layer_steps_in_proportion_to_its_grid():
    """Under a budget a 6-bit layer's scales and biases move (2**4 - 1) / (2**6 - 1) as far per
    Adam step as a 4-bit layer's (tune.bits, the width the learning rate is set for); a 3-bit
    layer's as far as a 4-bit one's."""
    from types import SimpleNamespace

    from stages.tune import _scales_optimizer

    model = nn.Sequential(*(nn.Linear(64, 64) for _ in range(3)))
    widths = {"layers.0": 4, "layers.1": 3, "layers.2": 6}
    nn.quantize(model, 32, 4, class_predicate=lambda p, m: {"bits": widths[p], "group_size": 32})
    model.freeze()
    for layer in model.layers:
        layer.unfreeze(keys=["scales", "biases"], recurse=False)
    config = TuneConfig(bits_per_weight=5.0, warmup_steps=0, schedule="constant")
    optimizer = _scales_optimizer(SimpleNamespace(config=config, model=model), total_steps=10)
    params = model.trainable_parameters()
    optimizer.init(params)
    grads = tree_flatten(params)
    ones = tree_unflatten([(k, mx.ones_like(v)) for k, v in grads])
    moved = dict(tree_flatten(optimizer.apply_gradients(ones, params)))
    step = {k: np.abs(np.array(moved[k] - v)).max() for k, v in grads}
    assert step["layers.0.scales"] == pytest.approx(config.learning_rate, rel=1e-3)
    assert step["layers.1.scales"] == pytest.approx(config.learning_rate, rel=1e-3)
    assert step["layers.2.scales"] == pytest.approx(config.learning_rate * 15 / 63, rel=1e-3)
    assert step["layers.2.biases"] == pytest.approx(step["layers.2.scales"], rel=1e-3)
    assert optimizer.learning_rate.item() == pytest.approx(config.learning_rate)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "qwen3_moe"])
def test_the_budget_counts_as_mlx_lm_measures_the_quantized_model(model_type, tmp_path):
    """bfloat16 models (16-bit scales and biases), an untied head, mixture-of-experts switch
    layers and a router mlx-lm's own predicate keeps at 8 bits: the layout's bits per weight
    for a mix is mlx-lm's compute_bits_per_weight of the model quantized with it."""
    from mlx_lm.utils import compute_bits_per_weight

    from tests.tiny_models import make_arch_model_folder

    folder = make_arch_model_folder(tmp_path / model_type, model_type)
    layout = model_layout(load_model(str(folder)).model, group_size=32)
    widths = [3, 4, 5, 6, 8]
    choice = {c.path: (widths[i % len(widths)], 32) for i, c in enumerate(layout.candidates)}
    per_layer = {p: {"bits": b, "group_size": g} for p, (b, g) in choice.items()}
    quantized, _ = quantize_student(load_model(str(folder)), 4, 32, per_layer=per_layer)
    assert layout.bits_per_weight(choice) == pytest.approx(compute_bits_per_weight(quantized))
    # 4 bits + a bfloat16 scale and bias per 32 weights, plus the few float parameters
    assert layout.bits_per_weight(layout.uniform(4)) == pytest.approx(4 + 2 * 16 / 32, abs=0.2)


@pytest.mark.parametrize("sizes", [None, [32, 64]], ids=["bits", "bits+group-sizes"])
def test_every_rank_tunes_rank_0s_mix(tiny_store, tmp_path, monkeypatch, sizes):
    """A rank whose own measurement broke a near tie the other way still takes rank 0's mix
    (simulated here: rank 0 gave the first layer 8 bits, in groups of 64 when those are
    allowed, 32 otherwise)."""
    from stages.distributed import Distributed

    size = 64 if sizes else 32

    def root_mix(self, values):  # [bits, group size] per layer, flat, in the layout's order
        return [8, size, *values[2:]]

    monkeypatch.setattr(Distributed, "from_root", root_mix)
    run_dir = tmp_path / "run"
    tune(
        tune_config(tiny_store, run_dir, bits_per_weight=BUDGET, allowed_group_sizes=sizes, **SHORT)
    )
    config = json.loads((run_dir / "model" / "config.json").read_text())
    saved = {
        p: (e["bits"], e["group_size"]) for p, e in layer_quantization(config, "tuned").items()
    }
    first = next(iter(chosen_options(run_dir)))  # the layout's order, as the mix was shared
    assert saved[first] == (8, size) and chosen_options(run_dir)[first] != (8, size)


def test_group_sizes_are_chosen_with_the_bits_and_saved_per_layer(tiny_store, tmp_path):
    """With tune.allowed_group_sizes a layer's group size is chosen too: the record, the saved
    config.json and mlx_lm.load agree on each layer's (bits, group size), the budget holds, and
    the mix uses more than one group size (3 bits alone: 4.0 bits per weight at 64 and 5.0 at
    32 with float32 scales, so 4.5 is spent only by putting some layers in groups of 32)."""
    from mlx_lm import load as mlx_load
    from mlx_lm.utils import compute_bits_per_weight

    run_dir = tmp_path / "run"
    sizes = {"allowed_group_sizes": [32, 64], "allowed_bits": [3]}
    tune(tune_config(tiny_store, run_dir, bits_per_weight=4.5, **sizes, **SHORT))
    chosen = chosen_options(run_dir)
    assert len({size for _, size in chosen.values()}) > 1
    config = json.loads((run_dir / "model" / "config.json").read_text())
    entries = layer_quantization(config, "tuned")
    assert {p: (e["bits"], e["group_size"]) for p, e in entries.items()} == chosen
    model, _ = mlx_load(str(run_dir / "model"))
    modules = dict(model.named_modules())
    assert {p: (modules[p].bits, modules[p].group_size) for p in chosen} == chosen
    stored = compute_bits_per_weight(model)
    assert stored == pytest.approx(sensitivities(run_dir)["bits_per_weight"], rel=1e-9)
    assert 4.3 < stored <= 4.5
    layers = sensitivities(run_dir)["layers"]
    assert all(layer["estimated_kl"].keys() == {"3g32", "3g64"} for layer in layers)
    from pipeline.report import build_figure, summarize

    summary = summarize(run_dir)
    assert any("3-bit g64" in line for line in summary.lines())
    _, panel = build_figure(summary).axes
    labels = [text.get_text() for text in panel.get_legend().get_texts()]
    assert labels == ["3-bit g32", "3-bit g64", "chosen"]


def test_allocation_spends_the_budget_on_group_sizes_where_they_pay():
    """A layer whose width a group size does not divide never gets it; at a budget below
    every layer at 4 bits in groups of 32 the estimate-led mix is cheaper in scales than
    bits-only and estimates less KL."""
    layout = Layout(
        [Candidate("wide", 4096, 32, columns=256), Candidate("odd", 4096, 32, columns=96)],
        group_size=32,
        fixed_bits=0,
        parameters=2 * 4096,
    )
    assert layout.candidates[1].options([4], [32, 64, 128]) == [(4, 32)]

    def estimate(bits: int, size: int) -> float:  # larger groups round a little worse
        return 4.0**-bits * (1 + size / 128)

    estimates = {
        c.path: {o: estimate(*o) for o in c.options([3, 4, 5], [32, 64, 128])}
        for c in layout.candidates
    }
    budget = 5.5  # float32 scales: 4 bits at 32 is 6.0, 5 bits at 128 is 5.5
    both = allocate(layout, estimates, [3, 4, 5], budget, [32, 64, 128])
    assert layout.bits_per_weight(both) <= budget
    assert both["odd"][1] == 32 and both["wide"][1] > 32
    bits_only = allocate(layout, estimates, [3, 4, 5], budget)
    total = lambda choice: sum(estimates[p][o] for p, o in choice.items())  # noqa: E731
    assert total(both) < total(bits_only)
    least, _ = bit_budget.reachable(layout, [3, 4, 5], [32, 64, 128])
    with pytest.raises(StageError, match="at 3 bits in its largest group") as refused:
        allocate(layout, estimates, [3, 4, 5], least - 0.1, [32, 64, 128])
    assert "in groups of 32, 64, 128" in str(refused.value)
    with pytest.raises(StageError, match="no allowed group size .64, 128. divides the width 96"):
        allocate(layout, estimates, [3, 4, 5], budget, [64, 128])


def test_group_size_settings_are_checked_and_keyed_only_when_they_choose():
    budget = TuneConfig(bits_per_weight=4.5, allowed_group_sizes=None)
    assert "allowed_group_sizes" not in budget.identity()
    same = TuneConfig(bits_per_weight=4.5, allowed_group_sizes=[64])
    assert same.resume_key() == budget.resume_key()
    wider = TuneConfig(bits_per_weight=4.5, allowed_group_sizes=[128, 64])
    assert wider.identity()["allowed_group_sizes"] == [64, 128]
    assert wider.resume_key() != budget.resume_key()
    assert TuneConfig(bits_per_weight=4.5).budget_group_sizes == [32, 64, 128]  # the default
    assert "allowed_group_sizes" not in TuneConfig().identity()  # no budget: nothing to choose
    assert TuneConfig(mode="nvfp4", group_size=16).allowed_group_sizes  # no budget: not checked
    for bad, words in (
        ({"allowed_group_sizes": [64, 100]}, "distinct values of 32, 64, 128"),
        ({"allowed_group_sizes": [32, 128]}, "must include tune.group_size"),
    ):
        with pytest.raises(InvalidConfig, match=words):
            TuneConfig(bits_per_weight=4.5, **bad)
    from_yaml = load_config(None, {"tune.allowed_group_sizes": [32, 64, 128]}).tune
    assert from_yaml.allowed_group_sizes == [32, 64, 128]


def test_resume_keys_are_those_earlier_versions_wrote():
    """A checkpoint is resumed only under the key it was saved with. Round-to-nearest starts
    keep the keys of version b6fcb4c (before group sizes): a budget run, which one with the
    group size of that time resumes, and a plain run. The GPTQ start's revision 3 (act-order
    and searched grids, after a31c551) moved the GPTQ keys on purpose: a checkpoint of the
    earlier GPTQ is refused; so did the GPTQ budget's revision 2 (estimates scaled by what
    GPTQ leaves of each layer's error). A change that moves them leaves every earlier checkpoint
    unresumable, so it must be deliberate (a revision). Those runs were made at the default
    rate of their time, 5e-5 (1.5e-5 since 5d1afa4: such a run resumes with that rate given)."""
    old_choice = {"tune.bits_per_weight": 4.5, "tune.allowed_group_sizes": [64]}
    rtn = {"tune.init": "rtn"}

    def key(overrides: dict) -> str:
        return load_config(None, overrides | {"tune.learning_rate": 5e-5}).tune.resume_key()

    assert key(old_choice | rtn) == "be171f3caa7f9b206692091d0edca9e9"
    assert key(rtn) == "d8aad2e5a8017881e87daaa64bd2da90"
    assert key(old_choice) == "bd0db0c41eafc01aa6ee5d0e4a19f167"  # d069d787... at revision 1
    assert key({}) == "734fca31cab0c6ab95e98ad20e20c52a"
    budget = load_config(None, {"tune.bits_per_weight": 4.5}).tune  # group sizes chosen too
    assert budget.identity()["allowed_group_sizes"] == [32, 64, 128]


def test_a_checkpoint_from_before_group_sizes_resumes_with_its_bits():
    from stages.tune import _recorded_layer_bits, _with_group_sizes

    old = {"layer_bits": {"a": 4, "b": 6}}
    assert _with_group_sizes(_recorded_layer_bits(old), 64) == {"a": [4, 64], "b": [6, 64]}
    new = {"layer_bits": {"a": [4, 128], "b": [6, 32]}}
    assert _with_group_sizes(_recorded_layer_bits(new), 64) == {"a": [4, 128], "b": [6, 32]}
    for damaged in ({"a": [4, 100]}, {"a": [7, 64]}, {"a": "4"}, {"a": [4]}):
        assert _recorded_layer_bits({"layer_bits": damaged}) is None
