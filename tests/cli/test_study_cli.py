"""``hsl study submit|status|results|plots`` and ``hsl compare``: argument handling here, and
end to end against a real ``hsl serve`` (a subprocess: SQLite, in-process worker)."""

from __future__ import annotations

import json

import pytest

import hsl_engine as he
from hsl import cli, cli_study, studies
from tests.integration.processes import Processes, base_env, wait_http
from tests.servers import free_port

SPEC = {
    "name": "cli-study",
    "model": {"d": 12, "q": 2, "epsilon": 0.5, "features": "gaussian"},
    "sweep": {"alphas": [1.5, 2.0, 2.5], "seeds": 2, "seed": 5, "n_test": 500},
    "methods": [{"name": "layerwise_spectral"}],
}


def test_axis_values_are_json_else_text():
    assert cli_study.parse_axis("model.gamma=0.4,1") == ("model.gamma", [0.4, 1])
    assert cli_study.parse_axis("model.activation=id,tanh") == ("model.activation", ["id", "tanh"])
    assert cli_study.parse_axis("methods.0.sample_split=true,false") == (
        "methods.0.sample_split",
        [True, False],
    )


@pytest.mark.parametrize("axis", ["model.gamma", "=1,2", "model.gamma="])
def test_a_malformed_axis_exits_2(tmp_path, capsys, axis):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(SPEC))
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "submit", str(spec), "--axis", axis, "--url", "http://127.0.0.1:9"])
    assert exc.value.code == 2
    assert "PATH=V1,V2" in capsys.readouterr().err


def test_a_study_needs_an_axis_and_valid_values(tmp_path, capsys):
    spec = tmp_path / "s.json"
    spec.write_text(json.dumps(SPEC))
    url = ["--url", f"http://127.0.0.1:{free_port()}"]  # never reached
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "submit", str(spec), *url])
    assert exc.value.code == 2 and "at least one --axis" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        cli.main(["study", "submit", str(spec), "--axis", "model.gamma=0.5,-2", *url])
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "axes.model.gamma" in err and "-2" in err


def test_study_body_from_a_preset_with_an_axis_replaced():
    body = cli_study.study_body("fig3-study-cpu", ["model.gamma=0.6,0.8"], None)
    assert body["axes"] == {"model.gamma": [0.6, 0.8]}
    assert body["name"] == "fig3-study-cpu"
    # the preset's base is the CPU-sized Fig. 3 spec
    assert he.parse_spec(body["base"]).model.features == "gaussian"
    body = cli_study.study_body("fig2-cpu", ["model.d=40,60"], "by-d")
    # an alias gives its target preset (and its name)
    assert body["name"] == "by-d" and body["base"]["name"] == he.preset("fig2-cpu").name


def test_every_study_preset_expands_to_valid_members():
    for name in studies.study_preset_names():
        body = studies.study_preset(name)
        members = studies.expand(he.parse_spec(body["base"]), body["axes"])
        assert len(members) == len(next(iter(body["axes"].values())))
        assert len({spec.spec_hash for _, spec in members}) == len(members)
    fig3 = studies.study_preset("fig3-study")
    assert fig3["axes"] == {"model.gamma": [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]}
    assert he.parse_spec(fig3["base"]).model.d == 400  # the paper's setting


@pytest.fixture
def served(tmp_path):
    port = free_port()
    procs = Processes(tmp_path, base_env())
    url = f"http://127.0.0.1:{port}"
    procs.start("serve", "serve", "--port", str(port))
    wait_http(f"{url}/readyz", procs=procs)
    try:
        yield procs, url
    finally:
        procs.stop_all()


def test_study_and_compare_from_the_command_line(served, tmp_path):
    procs, url = served
    (tmp_path / "spec.json").write_text(json.dumps(SPEC))

    study_id = procs.hsl(
        "study",
        "submit",
        "spec.json",
        "--axis",
        "model.gamma=0.6,1.0",
        "--wait",
        "--timeout",
        "110",
        "--tag",
        "cli",
        "--url",
        url,
    ).strip()

    status = procs.hsl("study", "status", study_id, "--url", url)
    assert "succeeded" in status and "gamma=0.6" in status and "gamma=1.0" in status
    doc = json.loads(procs.hsl("study", "status", study_id, "--json", "--url", url))
    assert doc["status"] == "succeeded" and doc["tags"] == ["cli"]
    table = procs.hsl("study", "results", study_id, "--out", "study.json", "--url", url)
    results = json.loads((tmp_path / "study.json").read_text())
    assert [m["params"] for m in results["members"]] == [{"model.gamma": 0.6}, {"model.gamma": 1.0}]
    for m in results["members"]:
        assert m["status"] == "succeeded" and len(m["thresholds"]) == m["d1"]
        assert m["experiment_id"][:12] in procs.hsl("status", m["experiment_id"], "--url", url)
    assert "gamma=0.6" in table and "exponent" in table
    procs.hsl("study", "plots", study_id, "--plots", "figs", "--url", url)
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == sorted(
        f"{n}.{f}" for n in ("mse", "exponent", "collapse") for f in ("png", "svg")
    )
    assert (tmp_path / "figs" / "exponent.png").read_bytes().startswith(b"\x89PNG")

    a, b = (m["experiment_id"] for m in results["members"])
    out = procs.hsl("compare", a, b, "--plots", "cmp", "--x", "n_over_n_half", "--url", url)
    assert "model.gamma: 0.6 | 1.0" in out and a[:12] in out
    assert sorted(p.name for p in (tmp_path / "cmp").iterdir()) == sorted(
        f"{n}.{f}" for n in ("mse", "overlap") for f in ("png", "svg")
    )
    # the same study again reuses every member: nothing is recomputed
    again = procs.hsl(
        "study", "submit", "spec.json", "--axis", "model.gamma=0.6,1.0", "--url", url
    ).strip()
    redoc = json.loads(procs.hsl("study", "status", again, "--json", "--url", url))
    assert [m["experiment_id"] for m in redoc["members"]] == [a, b]
    assert redoc["status"] == "succeeded"
