from __future__ import annotations

import json

import pytest
from plugin_utils import BROKEN_PLUGIN, GOOD_PLUGIN, make_dist
from support import run_cli, with_plugins_on_path

from mtkit.core.errors import MtkitError
from mtkit.core.registry import KINDS, Registry
from mtkit.plugins.manager import load_plugins


def test_lookup_and_did_you_mean():
    reg = Registry()
    reg.add("perturbation", "gaussian", object)
    reg.add("perturbation", "salt_pepper", int)
    assert reg.get("perturbation", "gaussian") is object
    with pytest.raises(MtkitError, match=r"unknown perturbation 'gausian'; did you mean 'gaussian'"):
        reg.get("perturbation", "gausian")
    with pytest.raises(MtkitError, match="Installed perturbations: gaussian, salt_pepper"):
        reg.get("perturbation", "zzz")
    with pytest.raises(MtkitError, match="unknown registry kind"):
        reg.get("attack", "fgsm")


def test_duplicate_names_are_refused():
    reg = Registry()
    reg.add("loss", "a", int)
    with pytest.raises(MtkitError, match="registered twice"):
        reg.add("loss", "a", float, origin="plugin-x 1.0")


def test_builtins_cover_every_kind_but_plugin_tasks():
    plugins = load_plugins(entry_points=False)
    reg = plugins.registry
    for kind in KINDS:
        if kind not in ("task", "model"):  # the trainer's own tasks and models need no entry; these are for plugins
            assert reg.names(kind), kind
    assert {"gaussian", "salt_pepper", "fgsm", "pgd"} <= set(reg.names("perturbation"))
    assert reg.entry("perturbation", "fgsm").origin == "builtin"


def test_known_provider_is_named_when_missing():
    reg = load_plugins(entry_points=False).registry
    with pytest.raises(MtkitError, match="provided by the plugin package 'mtkit-attacks'"):
        reg.get("perturbation", "segpgd")


def test_entry_point_plugin_registers_with_origin(tmp_path, monkeypatch):
    site = make_dist(tmp_path / "site", "mtkit-testplugin", "1.2.3", "mtkit_testplugin", GOOD_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    plugins = load_plugins()
    entry = plugins.registry.entry("perturbation", "uniform_noise")
    assert entry.origin == "mtkit-testplugin 1.2.3"
    assert plugins.failures == []


def test_broken_plugin_is_reported_and_others_work(tmp_path, monkeypatch):
    site = tmp_path / "site"
    make_dist(site, "mtkit-testplugin", "1.2.3", "mtkit_testplugin", GOOD_PLUGIN)
    make_dist(site, "mtkit-broken", "0.1", "mtkit_broken", BROKEN_PLUGIN)
    monkeypatch.syspath_prepend(str(site))
    plugins = load_plugins()
    assert [f.name for f in plugins.failures] == ["mtkit_broken"]
    assert "broken on purpose" in str(plugins.failures[0]) and "mtkit-broken 0.1" in str(plugins.failures[0])
    assert ("perturbation", "uniform_noise") in plugins.registry
    assert ("perturbation", "fgsm") in plugins.registry
    # an entry the broken plugin would have provided: the message names the plugin that failed
    with pytest.raises(MtkitError, match=r"unknown perturbation 'brokens_attack'\. Installed perturbations: .*\. "
                                         r"Not loaded, so their entries are missing: plugin 'mtkit_broken'"):
        plugins.registry.get("perturbation", "brokens_attack")


def test_cli_list_shows_plugin_origin_and_survives_broken_plugin(tmp_path, capsys, monkeypatch):
    site = tmp_path / "site"
    make_dist(site, "mtkit-testplugin", "1.2.3", "mtkit_testplugin", GOOD_PLUGIN)
    make_dist(site, "mtkit-broken", "0.1", "mtkit_broken", BROKEN_PLUGIN)
    with_plugins_on_path(site, monkeypatch)
    code, out, err = run_cli(["list", "perturbation"], capsys)
    assert code == 0, err
    line = next(ln for ln in out.splitlines() if "uniform_noise" in ln)
    assert "mtkit-testplugin 1.2.3" in line
    assert "fgsm" in out and "builtin" in out
    assert "mtkit_broken" in err and "broken on purpose" in err
    assert "Traceback" not in err


def test_registration_is_a_historic_hook_called_through_pluggy():
    """A plugin registered on the manager after the registry was built still adds its entries (historic=True),
    and the hook goes through pm.hook (a hook call monitor sees it)."""
    import types

    from mtkit.plugin_api import hookimpl

    plugins = load_plugins(entry_points=False)
    seen = []
    undo = plugins.manager.add_hookcall_monitoring(lambda name, impls, kwargs: seen.append(name), lambda *a: None)
    late = types.ModuleType("late_plugin")

    @hookimpl
    def mtkit_register(registry):
        registry.add("loss", "late_loss", object)

    late.mtkit_register = mtkit_register
    plugins.manager.register(late, name="late")
    undo()
    assert ("loss", "late_loss") in plugins.registry
    assert plugins.registry.entry("loss", "late_loss").origin != "builtin"
    assert "mtkit_register" in seen


def test_a_plugin_failing_half_way_leaves_no_entries(tmp_path, monkeypatch):
    half = """
from mtkit.plugin_api import hookimpl


@hookimpl
def mtkit_register(registry):
    registry.add("loss", "half_loss", object)
    raise ValueError("fails after one entry")
"""
    site = make_dist(tmp_path / "site", "mtkit-half", "0.2", "mtkit_half", half)
    monkeypatch.syspath_prepend(str(site))
    plugins = load_plugins()
    assert [f.name for f in plugins.failures] == ["mtkit_half"] and "fails after one entry" in str(plugins.failures[0])
    assert ("loss", "half_loss") not in plugins.registry
    assert not plugins.manager.has_plugin("mtkit_half")
    assert ("perturbation", "fgsm") in plugins.registry


def test_list_is_one_line_per_entry_that_grep_finds_at_any_width(capsys, monkeypatch):
    """Piped or in 80 columns, `mtkit list` gives one line per entry with its whole name (issue: `monodepth2_d…`),
    `mtkit list NAME` the whole description and every option with its default, `--json` every entry in full."""
    from mtkit.plugins.manager import get_registry

    monkeypatch.setenv("COLUMNS", "80")
    code, out, err = run_cli(["list"], capsys)
    assert code == 0, err
    entries = list(get_registry())
    lines = out.splitlines()
    assert len(lines) == len(entries) and "…" not in out
    for e in entries:  # `mtkit list | grep NAME` finds the entry's own line
        assert any(ln.split()[:2] == [e.name, e.kind] for ln in lines), e.name
    code, out, err = run_cli(["list", "metzen_dynamic"], capsys)
    assert code == 0, err
    flat = " ".join(out.split())
    assert "weighing the two by ω" in flat  # the whole description, not its first line
    for option, default in (("hidden_class", "11"), ("omega", "0.9"), ("tau", "0.75"), ("iterations", "None")):
        assert option in out and default in out, option
    code, out, err = run_cli(["list", "--json"], capsys)
    data = json.loads(out)
    assert {(d["kind"], d["name"]) for d in data} == {(e.kind, e.name) for e in entries}
    by_name = {d["name"]: d for d in data}  # what ε is, per perturbation: an RMS or a bound
    assert by_name["pgd_rms"]["epsilon"].startswith("L2 ball of RMS ε") and "L∞" in by_name["pgd"]["epsilon"]
    assert all(d.get("epsilon") for d in data if d["kind"] == "perturbation")
    opgd = next(d for d in data if d["name"] == "opgd")
    assert {o["name"]: o["default"] for o in opgd["options"]}["detector_loss"] == "detector"
    code, out, err = run_cli(["list", "perturbation", "--json"], capsys)
    assert {d["kind"] for d in json.loads(out)} == {"perturbation"}
    code, out, err = run_cli(["list", "metzen_dynamc"], capsys)
    assert code == 2 and "metzen_dynamic" in err and "Traceback" not in err  # did you mean
