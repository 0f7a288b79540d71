# The binding contract: options structs bound by field name (round trips, unknown fields and bad
# names rejected), no Python wrapper passing more than 5 positional arguments to pyswitch._core
# (read from the wrappers' source), and every bindings file under 500 lines.
import ast
from pathlib import Path

import pytest

import pyswitch
from pyswitch import _core

REPO = Path(__file__).resolve().parents[1]


def test_options_structs_round_trip_by_field_name():
    route = _core.RouteOptions(
        k=2,
        capacity_factor=None,
        min_capacity=1,
        group_size=8,
        priority="batch_prioritized",
        capacity_rounding="ceil",
        normalize_gates=True,
    )
    assert (route.k, route.capacity_factor, route.min_capacity, route.group_size) == (2, None, 1, 8)
    assert (route.priority, route.capacity_rounding, route.normalize_gates) == (
        "batch_prioritized",
        "ceil",
        True,
    )
    router = _core.RouterOptions(route=route, jitter_eps=0.0, seed=9)
    assert router.route.k == 2 and router.seed == 9
    router.route.k = 3  # nested structs are live, not copies
    assert router.route.k == 3
    ffn = _core.SwitchFFNOptions(router=router, activation="geglu", dtype="bfloat16")
    assert (ffn.activation, ffn.dtype, ffn.router.route.group_size) == ("geglu", "bfloat16", 8)
    defaults = _core.RouteOptions()
    assert (defaults.k, defaults.capacity_factor, defaults.group_size) == (1, 1.25, None)
    lm = _core.SwitchLMConfig(d_model=64, dtype="bfloat16")
    assert (lm.d_model, lm.dtype, lm.num_experts) == (64, "bfloat16", 8)
    trainer = _core.TrainerOptions(optimizer="adafactor", clip=0.5)
    trainer.adamw.beta2 = 0.99
    assert (trainer.optimizer, trainer.clip, trainer.adamw.beta2) == ("adafactor", 0.5, 0.99)


def test_options_structs_reject_unknown_fields_and_bad_names():
    with pytest.raises(ValueError, match="RouteOptions: unknown field 'capacity'"):
        _core.RouteOptions(capacity=1.0)
    with pytest.raises(ValueError, match="priority must be 'position' or 'batch_prioritized'"):
        _core.RouteOptions(priority="random")
    with pytest.raises(ValueError, match="capacity_rounding must be 'floor' or 'ceil'"):
        _core.RouteOptions(capacity_rounding="round")
    with pytest.raises(ValueError, match="group_size must be positive"):
        _core.RouteOptions(group_size=0)
    with pytest.raises(ValueError, match="activation must be 'relu', 'gelu' or 'geglu'"):
        _core.DenseFFNOptions(activation="tanh")
    with pytest.raises(ValueError, match="dtype must be 'float32' or 'bfloat16', got 'float16'"):
        _core.SwitchLMConfig(dtype="float16")
    with pytest.raises(TypeError):
        _core.AdamWOptions(beta1="high")


def _calls_core(func: ast.expr) -> bool:
    """`_core.name(...)` or a method of a core object held as `._impl` / `_impl`."""
    while isinstance(func, ast.Attribute):
        func = func.value
        if isinstance(func, ast.Attribute) and func.attr == "_impl":
            return True
        if isinstance(func, ast.Name) and func.id in ("_core", "_impl"):
            return True
    return False


def test_no_wrapper_passes_more_than_five_positional_arguments_to_core():
    offenders, calls = [], 0
    for path in sorted(Path(pyswitch.__file__).parent.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and _calls_core(node.func):
                calls += 1
                starred = any(isinstance(a, ast.Starred) for a in node.args)
                if starred or len(node.args) > 5:
                    offenders.append(f"{path.name}:{node.lineno}")
    assert calls > 20, "the scan found too few calls into _core to be looking at the right thing"
    assert not offenders, f"more than 5 positional arguments to _core at {offenders}"


def test_every_bindings_file_is_under_500_lines():
    files = sorted((REPO / "cpp" / "bindings").glob("*.[ch]pp"))
    if not files:
        pytest.skip("not run from a source checkout")
    sizes = {f.name: len(f.read_text().splitlines()) for f in files}
    assert max(sizes.values()) <= 500, sizes
