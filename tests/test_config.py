"""The params schema: every shipped profile validates; each kind of bad value is named with key, value and rule."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import Params, ParamsError, load_params, validate_params
from pipeline.profiles import available, defaults, read_overlay, render, render_text

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
PROFILES = available(CONFIGS)


@pytest.fixture
def raw() -> dict[str, Any]:
    """A fresh, valid parsed params mapping (the smoke profile) to break one key at a time."""
    return render("smoke", CONFIGS)


def error_of(raw: dict[str, Any]) -> str:
    with pytest.raises(ParamsError) as caught:
        validate_params(raw)
    return str(caught.value)


def test_the_four_profiles_are_shipped() -> None:
    assert set(PROFILES) >= {"smoke", "digits", "toy2d", "cifar10"}


@pytest.mark.parametrize("name", PROFILES)
def test_every_profile_validates_and_names_itself(name: str, tmp_path: Path) -> None:
    (tmp_path / "params.yaml").write_text(render_text(name, CONFIGS))
    params = load_params(tmp_path / "params.yaml")
    assert isinstance(params, Params)
    assert params.profile == name  # `slimstep profile X` labels runs with the profile it wrote
    assert params.pairs.train_set in params.pairs.sets
    assert params.msd.students == list(range(len(params.msd.students)))


def set_key(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    *parents, leaf = path.split(".")

    def edit(raw: dict[str, Any]) -> None:
        node = raw
        for part in parents:
            node = node[part]
        node[leaf] = value

    return edit


def drop_key(path: str) -> Callable[[dict[str, Any]], None]:
    *parents, leaf = path.split(".")

    def edit(raw: dict[str, Any]) -> None:
        node = raw
        for part in parents:
            node = node[part]
        del node[leaf]

    return edit


# (edit, fragments the message must hold: the dotted key, the bad value, what is allowed)
FIELD_ERRORS = {
    "wrong type": (set_key("teacher.lr", "not-a-number"), ["teacher.lr", "'not-a-number'", "valid number"]),
    "zero steps": (set_key("teacher.steps", 0), ["teacher.steps", "= 0", "greater than 0"]),
    "ema decay >= 1": (set_key("teacher.ema_decay", 1.5), ["teacher.ema_decay", "1.5", "less than 1"]),
    "negative seed": (set_key("pairs.seed", -1), ["pairs.seed", "-1", "greater than or equal to 0"]),
    "bad dataset": (set_key("data.dataset", "imagenet"), ["data.dataset", "'imagenet'", "'digits'", "'npz'"]),
    "bad net kind": (
        set_key("teacher.net.kind", "transformer"),
        ["teacher.net.kind", "'transformer'", "'mlp'", "'unet'"],
    ),
    "bad device": (set_key("device", "tpu"), ["device", "'tpu'", "'cuda'"]),
    "unknown key": (set_key("teacher.lrr", 0.1), ["teacher.lrr", "unknown key", "0.1", "pipeline/config.py"]),
    "missing section": (drop_key("eval"), ["eval", "missing (required)"]),
    "missing key": (drop_key("teacher.steps"), ["teacher.steps", "missing (required)"]),
    "bad eval sampler": (
        set_key("eval.teacher_samplers", ["euler-4", "euler-0"]),
        ["eval.teacher_samplers", "'euler-0'", "euler-N", "dopri5-TOL"],
    ),
    "bad pair solver": (
        set_key("pairs.sets.teacher.solver", "rk4"),
        ["pairs.sets.teacher.solver", "'rk4'", "heun-N"],
    ),
    "absolute data path": (
        set_key("data.path", "/abs/data.npz"),
        ["data.path", "'/abs/data.npz'", "inside the repository", "slimstep import-data"],
    ),
    "toy2d components": (
        set_key("data.toy2d_components", 1),
        ["data.toy2d_components", "= 1", "greater than or equal to 2"],
    ),
}

# Cross-field rules: the message names the section, both keys, their values and the rule.
CROSS_FIELD_ERRORS = {
    "shard not multiple of solve batch": (
        set_key("pairs.shard_size", 300),
        ["pairs", "shard_size (300)", "multiple of solve_batch (250)"],
    ),
    "s_min above s_max": (set_key("distill.s_min", 0.9), ["distill", "s_min (0.9)", "s_max (0.8)"]),
    "students not 0..K-1": (set_key("msd.students", [1, 2]), ["msd", "students", "0..K-1", "[1, 2]"]),
    "train_set not a set": (set_key("pairs.train_set", "nope"), ["pairs", "train_set 'nope'", "['rl', 'teacher']"]),
    "train_set solved by a student": (
        lambda raw: raw["pairs"].update(
            sets={**raw["pairs"]["sets"], "regen": {"solver": "euler-4", "flow": "models/anneal@slimflow"}},
            train_set="regen",
        ),
        ["pairs", "train_set 'regen'", "models/anneal@slimflow", "cycle"],
    ),
    "distill pair set unknown": (set_key("distill.pair_set", "nope"), ["distill.pair_set 'nope'", "['rl', 'teacher']"]),
    "h_min above h_max": (
        lambda raw: raw["stepper"].update(h_min=0.5, h_max=0.25),
        ["stepper", "h_min (0.5)", "h_max (0.25)"],
    ),
}


@pytest.mark.parametrize("case", list(FIELD_ERRORS | CROSS_FIELD_ERRORS))
def test_bad_value_is_named_with_key_value_and_rule(raw: dict[str, Any], case: str) -> None:
    edit, fragments = (FIELD_ERRORS | CROSS_FIELD_ERRORS)[case]
    edit(raw)
    message = error_of(raw)
    assert message.startswith("params.yaml: invalid parameters")
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in:\n{message}"
    assert "Traceback" not in message and "errors.pydantic.dev" not in message


@pytest.mark.parametrize(
    ("case", "keys"),
    [
        ("shard not multiple of solve batch", ["pairs.shard_size", "pairs.solve_batch"]),
        ("s_min above s_max", ["distill.s_min", "distill.s_max"]),
        ("students not 0..K-1", ["msd.students"]),
        ("train_set not a set", ["pairs.train_set"]),
        ("train_set solved by a student", ["pairs.train_set"]),
        ("distill pair set unknown", ["distill.pair_set"]),
    ],
)
def test_cross_field_error_names_the_dotted_key(raw: dict[str, Any], case: str, keys: list[str]) -> None:
    edit, _ = CROSS_FIELD_ERRORS[case]
    edit(raw)
    message = error_of(raw)
    assert any(key in message for key in keys), message
    assert "'checkpoint_every'" not in message and "'n_pairs'" not in message  # no dump of the whole section


def test_every_bad_key_is_reported_at_once(raw: dict[str, Any]) -> None:
    raw["teacher"]["lr"] = "fast"
    raw["anneal"]["steps"] = -5
    raw["eval"]["knn_kk"] = 3
    lines = [line for line in error_of(raw).splitlines() if line.startswith("  - ")]
    assert len(lines) == 3
    assert {line.split()[1] for line in lines} == {"teacher.lr", "anneal.steps", "eval.knn_kk:"}


def test_source_name_leads_the_message(raw: dict[str, Any]) -> None:
    raw["teacher"]["steps"] = 0
    with pytest.raises(ParamsError, match=r"^configs/mine\.yaml: invalid parameters"):
        validate_params(raw, "configs/mine.yaml")


@pytest.mark.parametrize("document", ["- a\n- b\n", "just a string\n", ""])
def test_non_mapping_yaml_is_refused(tmp_path: Path, document: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(document)
    with pytest.raises(ParamsError, match="expected a mapping of sections, got (list|str|NoneType)"):
        load_params(path)


def test_yaml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("teacher:\n  lr: [0.1\n  steps: 3\n")
    with pytest.raises(ParamsError) as caught:
        load_params(path)
    assert str(caught.value).startswith(f"{path}: not valid YAML")
    assert "line" in str(caught.value)  # the YAML parser's position survives


def test_missing_file_says_how_to_make_one(tmp_path: Path) -> None:
    with pytest.raises(ParamsError, match=r"not found \(write one with `slimstep profile digits`\)"):
        load_params(tmp_path / "params.yaml")


def test_valid_file_loads_typed_values(tmp_path: Path) -> None:
    text = render_text("smoke", CONFIGS)
    assert "  lr: 0.001\n" in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("  lr: 0.001\n", "  lr: 2e-3\n", 1))  # PyYAML reads `2e-3` as a string
    params = load_params(path)
    assert params.teacher.lr == pytest.approx(2e-3)
    assert params.teacher.net.kind == "mlp" and params.pairs.sets["rl"].solver == "rl"


def test_stage_with_broken_params_exits_2_without_traceback(tmp_path: Path, raw: dict[str, Any]) -> None:
    raw["teacher"]["lr"] = "not-a-number"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "SLIMSTEP_TRACKING": "off"}
    env.pop("SLIMSTEP_PARAMS", None)
    result = subprocess.run(
        [sys.executable, "-m", "stages", "teacher"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    out = result.stdout + result.stderr
    assert result.returncode == 2, out
    assert "teacher.lr" in out and "'not-a-number'" in out and "dvc checkout" in out
    assert "Traceback" not in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing was run or written


# One source: the schema's defaults are the digits profile; every other profile is an overlay of differences.
def test_params_yaml_is_the_rendered_default_profile() -> None:
    assert (ROOT / "params.yaml").read_text() == render_text("digits", CONFIGS)


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        out.update(_leaves(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


@pytest.mark.parametrize("name", PROFILES)
def test_overlay_keys_exist_in_the_schema_and_differ_from_the_defaults(name: str) -> None:
    """A profile lists only what it changes; a pair set of its own (pairs.sets.<new>) is all new keys."""
    base = _leaves(defaults())
    overlay = {k: v for k, v in _leaves(read_overlay(name, CONFIGS)).items()
               if not k.startswith("pairs.sets.") or k in base}  # fmt: skip
    assert set(overlay) <= set(base), f"configs/{name}.yaml has keys the schema lacks: {set(overlay) - set(base)}"
    repeated = sorted(k for k in overlay if overlay[k] == base[k])
    assert not repeated, f"configs/{name}.yaml repeats defaults (declare each value once): {repeated}"


def test_an_overlay_with_an_unknown_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("teacher:\n  stepz: 3\n")
    with pytest.raises(ParamsError, match="teacher.stepz: unknown key"):
        render("mine", tmp_path)


def test_an_incomplete_params_file_is_refused_naming_what_is_missing(raw: dict[str, Any]) -> None:
    del raw["teacher"]["net"]["width"], raw["eval"]
    message = error_of(raw)
    assert "  - eval: missing (required)" in message and "  - teacher.net.width: missing (required)" in message
    assert "slimstep profile NAME" in message
