"""The one settings table: a setting declared once reaches the command line and recipes alike."""

from __future__ import annotations

import typer
from typer.testing import CliRunner

from edgeskin import settings as S
from edgeskin.recipe.schema import _sections, _value_specs


def test_a_setting_declared_once_is_a_flag_a_recipe_key_and_a_checked_value():
    extra = (S.Setting("warmup", int, 1, "Warm-up epochs.", lo=0, hi=10),
             S.Setting("mode", str, "a", "a | b.", choices=("a", "b")))
    seen = {}
    app = typer.Typer()

    @app.command()
    @S.command_options(extra)
    def cmd(name: str = typer.Option("x"), settings: dict = None) -> None:  # type: ignore[assignment]
        seen.update(settings, name=name)

    r = CliRunner().invoke(app, ["--warmup", "3", "--mode", "b"])
    assert r.exit_code == 0, r.output
    assert seen == {"warmup": 3, "mode": "b", "name": "x"}
    assert CliRunner().invoke(app, ["--warmup", "11"]).exit_code == 2  # the range is the flag's too
    r = CliRunner().invoke(app, ["--mode", "c"])
    assert r.exit_code == 1 and "--mode 'c' is not one of: a, b" in str(r.exception)
    assert S.recipe_keys(extra) == {"warmup", "mode"}
    specs = S.recipe_specs(extra)
    assert specs["warmup"].hi == 10 and specs["mode"].choices == ("a", "b")


def test_recipe_sections_take_exactly_the_settings_of_their_commands():
    keys = _sections()
    assert keys["ensemble"] == S.recipe_keys(S.training(), S.ensemble()) | {"load"}
    assert keys["student"] == S.recipe_keys(S.training(), S.student()) | {"load"}
    assert S.recipe_keys(S.bench_timing()) <= keys["bench"]
    assert _value_specs()["student"]["latency_threads"].lo == 1


def test_train_and_distill_flags_are_the_settings():
    from edgeskin.cli import app

    cmd = typer.main.get_command(app)
    flags = {name: {o for p in cmd.commands[name].params for o in (*p.opts, *p.secondary_opts)}
             for name in ("train", "distill", "qat", "bench")}
    for name, groups in (("train", (S.training(), S.ensemble())), ("distill", (S.training(), S.student())),
                         ("qat", (S.qat_single(),)), ("bench", (S.bench_timing(),))):
        for s in S._names(groups):
            want = (s.flags or (f"--{s.name.replace('_', '-')}",))[0].split("/")[0]
            assert want in flags[name], (name, want)


def test_the_builders_hold_each_rule_once():
    # a student that starts from a teacher member gets a third of the learning rate unless lr is given
    assert S.distill_config({}).member_lr_factor == 1 / 3
    assert S.distill_config({"lr": 0.01}).member_lr_factor is None
    # recipes and the command line differ only where declared: the distillation report is the bench's job in a recipe
    assert S.values((S.student(),), {}, S.CLI)["report_on"] == "test"
    assert S.values((S.student(),), {}, S.RECIPE)["report_on"] == "none"
    cfg = S.train_config({"preset": "tiny", "epochs": 2, "pretrained": "none", "finetune_stages": 2})
    assert (cfg.epochs, cfg.size, cfg.pretrained, cfg.finetune_stages) == (2, 64, None, "2")
    assert S.member_losses({"losses": "focal"}, 3) == ["focal"] * 3
    assert S.member_losses({"losses": "wce,focal"}, 2) == ["wce", "focal"]
