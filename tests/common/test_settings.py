"""common.settings: one dataclass field -> --help, plan schema, argv, typed values, field-named errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest
import typer
from typer.testing import CliRunner

from cli.options import typer_command
from common.settings import (
    SettingError,
    build,
    check_choices,
    coerce_values,
    field_docs,
    flat_values,
    options_of,
    schema_of,
    to_argv,
)


def from_values(cls, values, where="", **kw):
    """A settings instance from flat values, as a plan section or a config file gives them."""
    return build(cls, coerce_values(cls, values, where, **kw))


@dataclass
class Capture:
    top_k: int = 64
    """Most likely next tokens stored per position."""
    engine: Literal["auto", "hf", "vllm"] = "auto"
    """Which engine runs the teacher."""


@dataclass
class Fake:
    model: str
    """Teacher: a folder or hub id."""
    capture: Capture = field(default_factory=Capture)
    lr: float = 5e-4
    """Peak learning rate."""
    reuse: bool = True
    """Return an identical cache instead of rebuilding."""
    metrics: tuple[str, ...] = ("ppl",)
    """Metrics, comma-separated."""
    limit: int | None = None
    """Only the first N rows."""
    out: str | None = field(default=None, metadata={"plan": False})
    """Set by the plan runner."""

    def __post_init__(self):
        if self.capture.top_k < 1:
            raise SettingError("{top_k} must be >= 1, got " + str(self.capture.top_k))


def test_field_docs_and_flat_options_of_nested_groups():
    assert field_docs(Fake)["lr"] == "Peak learning rate."
    names = [o.name for o in options_of(Fake)]
    assert names == ["model", "top_k", "engine", "lr", "reuse", "metrics", "limit", "out"]
    top_k = next(o for o in options_of(Fake) if o.name == "top_k")
    assert top_k.path == ("capture", "top_k") and top_k.flag == "--top-k" and top_k.default == 64
    assert next(o for o in options_of(Fake) if o.name == "engine").choices == ("auto", "hf", "vllm")


def test_from_values_builds_nested_and_refuses_unknown_and_ill_typed():
    config = from_values(Fake, {"model": "m", "top_k": 8, "lr": 1, "metrics": "ppl,rouge"}, "train")
    assert config.capture.top_k == 8 and config.lr == 1.0 and isinstance(config.lr, float)
    assert config.metrics == ("ppl", "rouge")
    with pytest.raises(SettingError, match=r"unknown setting\(s\) train.loss_kind; valid: .*lr"):
        from_values(Fake, {"model": "m", "loss_kind": "x"}, "train")
    with pytest.raises(SettingError, match="train.top_k is a whole number; got 'many'"):
        from_values(Fake, {"model": "m", "top_k": "many"}, "train")
    with pytest.raises(SettingError, match="train.reuse is true or false; got 'yes'"):
        from_values(Fake, {"model": "m", "reuse": "yes"}, "train")
    with pytest.raises(SettingError, match="train.engine must be one of auto, hf, vllm; got 'gpu'"):
        from_values(Fake, {"model": "m", "engine": "gpu"}, "train")
    with pytest.raises(SettingError, match="train.lr is a number; got True"):
        from_values(Fake, {"model": "m", "lr": True}, "train")


def test_plan_only_keys_filter():
    with pytest.raises(SettingError, match=r"unknown setting\(s\) cache.out"):
        from_values(Fake, {"model": "m", "out": "x"}, "cache", allow=lambda o: o.plan)


def test_errors_name_fields_rendered_per_reader():
    with pytest.raises(SettingError) as info:
        from_values(Fake, {"model": "m", "top_k": 0})
    assert str(info.value) == "--top-k must be >= 1, got 0"
    assert info.value.render(lambda name: f"cache.{name}") == "cache.top_k must be >= 1, got 0"


def test_to_argv_round_trips_through_the_generated_command():
    config = Fake(model="m", capture=Capture(top_k=8, engine="hf"), reuse=False, metrics=("ppl", "rouge"), limit=3)
    argv = to_argv(config)
    assert argv == ["--model", "m", "--top-k", "8", "--engine", "hf", "--no-reuse", "--metrics", "ppl,rouge",
                    "--limit", "3"]
    seen = []
    app = typer.Typer(rich_markup_mode=None)
    app.command("go")(typer_command(Fake, lambda cfg: seen.append(cfg), doc="Go."))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["go", *argv])
    assert result.exit_code == 0, result.output
    assert seen == [config]
    assert flat_values(seen[0])["top_k"] == 8


def test_float_argv_keeps_full_precision():
    config = Fake(model="m", lr=1 / 3)
    seen = []
    app = typer.Typer(rich_markup_mode=None)
    app.command("go")(typer_command(Fake, lambda cfg: seen.append(cfg)))
    app.command("other")(lambda: None)
    assert CliRunner().invoke(app, ["go", *to_argv(config)]).exit_code == 0
    assert seen[0].lr == 1 / 3


def test_generated_command_spells_field_errors_as_flags():
    from common.settings import CliError

    app = typer.Typer(rich_markup_mode=None)
    app.command("go")(typer_command(Fake, lambda cfg: None))
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["go", "--model", "m", "--top-k", "0"])
    assert isinstance(result.exception, CliError)
    assert str(result.exception) == "--top-k must be >= 1, got 0"


def test_a_new_field_appears_in_help_schema_and_argv_with_nothing_else_written():
    """The issue's proof: adding one dataclass field is enough for --help, the plan schema and the argv."""
    @dataclass
    class WithDummy(Fake):
        dummy_knob: int = 7
        """A knob added in one place only."""

    app = typer.Typer(rich_markup_mode=None)
    app.command("go")(typer_command(WithDummy, lambda cfg: None))
    app.command("other")(lambda: None)
    help_text = CliRunner().invoke(app, ["go", "--help"], terminal_width=200).output
    assert "--dummy-knob" in help_text and "A knob added in one place only." in help_text
    assert schema_of(WithDummy)["dummy_knob"] == {"type": "int", "default": 7, "required": False, "choices": None,
                                                  "help": "A knob added in one place only."}
    assert "out" not in schema_of(WithDummy)  # set by the runner, not a plan key
    assert to_argv(WithDummy(model="m", dummy_knob=9))[-2:] == ["--dummy-knob", "9"]
    assert from_values(WithDummy, {"model": "m", "dummy_knob": 3}, "train").dummy_knob == 3


def test_bool_flags_have_no_metavar_and_choices_are_listed():
    app = typer.Typer(rich_markup_mode=None)
    app.command("go")(typer_command(Fake, lambda cfg: None))
    app.command("other")(lambda: None)
    help_text = CliRunner().invoke(app, ["go", "--help"], terminal_width=200).output
    assert "--reuse" in help_text and "--no-reuse" in help_text and "<bool>" not in help_text.lower()
    assert "<auto|hf|vllm>" in help_text


def test_unsupported_field_types_are_refused_when_the_command_is_defined():
    @dataclass
    class Bad:
        mapping: dict = dataclasses.field(default_factory=dict)

    with pytest.raises(TypeError, match="bool, int, float, str"):
        options_of(Bad)


@dataclass
class Switches:
    keep: bool = field(default=True, metadata={"off": "--drop"})
    """Keep it."""
    verbose: bool = False
    """Say more."""
    engine: Literal["auto", "hf"] = "auto"
    """Which engine."""

    def __post_init__(self):
        check_choices(self, SettingError)


def test_numbers_as_text_named_off_flags_and_kept_defaults():
    """YAML reads 3e-4 as text: numbers are read as the command line reads them. A bool's False may have its own
    flag; a plain flag that is False is never written; `keep` writes settings even at their defaults."""
    assert coerce_values(Fake, {"lr": "3e-4", "limit": "12"}) == {"lr": 3e-4, "limit": 12}
    assert to_argv(Switches(keep=False)) == ["--drop"]
    assert to_argv(Switches(), keep=frozenset({"keep", "verbose", "engine"})) == ["--keep", "--engine", "auto"]
    app = typer.Typer(rich_markup_mode=None)
    seen = []
    app.command("go")(typer_command(Switches, seen.append))
    app.command("other")(lambda: None)
    assert CliRunner().invoke(app, ["go", "--drop", "--verbose"]).exit_code == 0
    assert seen == [Switches(keep=False, verbose=True)]
    help_text = CliRunner().invoke(app, ["go", "--help"], terminal_width=200).output
    assert "--keep / --drop" in help_text and "--no-verbose" not in help_text


def test_choices_are_checked_however_the_settings_are_made():
    with pytest.raises(SettingError, match=r"^--engine must be one of auto, hf; got 'tpu'$"):
        Switches(engine="tpu")
    with pytest.raises(SettingError, match=r"^--model must be given$"):
        build(Fake, {})
