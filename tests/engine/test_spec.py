import json
import math

import pytest

import hsl_engine as he


def errors_of(data):
    with pytest.raises(he.SpecError) as info:
        he.parse_spec(data)
    return {e["field"]: e["message"] for e in info.value.errors}


def test_defaults_are_filled_and_hash_is_stable():
    a = he.parse_spec({"model": {"d": 20}, "sweep": {"alphas": [1.5, 2.0]}})
    b = he.parse_spec(json.loads(a.canonical_json()))
    assert a == b
    assert a.spec_hash == b.spec_hash
    assert a.spec_hash.startswith("sha256:") and len(a.spec_hash) == 7 + 64
    dumped = a.model_dump(mode="json")
    assert dumped["model"]["gamma"] == 1.0
    assert dumped["methods"] == [
        {
            "name": "layerwise_spectral",
            "sample_split": True,
            "readout": "fit",
            "readout_degree": None,
            "readout_ridge": 1e-3,
            "spectrum": "top",
        }
    ]
    assert dumped["solver"] == {
        "eigensolver": "auto",
        "dtype": "float64",
        "tol": None,
        "max_passes": 300,
        "backend": "auto",
        "tf32": False,
    }
    assert dumped["device"] == "auto"


def test_hash_changes_with_any_field():
    base = {"model": {"d": 20}, "sweep": {"alphas": [1.5, 2.0]}}
    h0 = he.parse_spec(base).spec_hash
    h1 = he.parse_spec({**base, "model": {"d": 21}}).spec_hash
    h2 = he.parse_spec({**base, "sweep": {"alphas": [1.5, 2.0], "seed": 1}}).spec_hash
    assert len({h0, h1, h2}) == 3


def test_api_example_spec_is_accepted():
    spec = he.parse_spec(
        {
            "name": "fig2-cpu",
            "model": {
                "d": 60,
                "q": 2,
                "epsilon": 0.5,
                "d1": None,
                "gamma": 1.0,
                "activation": "id",
                "features": "hermite",
                "noise_std": 0.0,
            },
            "sweep": {
                "alphas": [1.5, 1.75, 2.0, 2.25, 2.5, 2.75, 3.0],
                "n_values": None,
                "seeds": 3,
                "seed": 0,
                "n_test": 5000,
            },
            "methods": [
                {"name": "layerwise_spectral", "sample_split": True},
                {"name": "kernel_rbf"},
            ],
            "solver": {"eigensolver": "auto", "dtype": "float64"},
            "device": "auto",
        }
    )
    assert spec.model.hidden_dim == 8
    assert spec.model.feature_dim == 1830
    assert [n for n, _ in spec.sample_sizes()] == [465, 1293, 3600, 10019, 27885, 77610, 216000]


@pytest.mark.parametrize(
    ("data", "field", "fragment"),
    [
        ({"model": {"d": 10**6}}, "model.d", "[2, 100000]"),
        ({"model": {"d": 1}}, "model.d", "[2, 100000]"),
        ({"model": {"q": 10**6}}, "model.q", "2 or 3"),
        ({"model": {"q": 10**9}}, "model.q", "2 or 3"),
        ({"model": {"gamma": -0.1}}, "model.gamma", "[0, 10]"),
        ({"model": {"epsilon": 0}}, "model.epsilon", "(0, 1]"),
        ({"model": {"d": 4, "d1": 11}}, "model.d1", "D = C(d + q - 1, q) = 10"),
        ({"sweep": {"alphas": [1.5], "n_values": [100]}}, "sweep", "exactly one"),
        ({"sweep": {"alphas": None}}, "sweep", "exactly one"),
        ({"sweep": {"alphas": [9.0]}}, "sweep.alphas.0", "(0, 8]"),
        ({"model": {"d": 100000}, "sweep": {"alphas": [2.0]}}, "sweep.alphas", "1000000000"),
        ({"sweep": {"n_values": [5]}}, "sweep.n_values.0", "[10, 1e+09]"),
        ({"sweep": {"alphas": [2.0], "seeds": 0}}, "sweep.seeds", "[1, 1000]"),
        ({"sweep": {"n_values": [100, 100]}}, "sweep", "same sample size"),
        ({"methods": []}, "methods", "at least 1"),
        ({"methods": [{"name": "kernel_rbf"}, {"name": "kernel_rbf"}]}, "methods", "once"),
        ({"methods": [{"name": "kernel_rbf", "ridge": 0}]}, "methods.0.ridge", "(0, 1e+06]"),
        ({"methods": [{"name": "magic"}]}, "methods.0", "layerwise_spectral"),
        ({"solver": {"dtype": "float16"}}, "solver.dtype", "float64"),
        ({"device": "tpu"}, "device", "cuda"),
    ],
)
def test_out_of_range_values_name_field_and_range(data, field, fragment):
    errs = errors_of(data)
    assert field in errs, errs
    assert fragment in errs[field]


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"status": "succeeded"}, "status"),
        ({"tenant": "other"}, "tenant"),
        ({"model": {"d": 10, "results": []}}, "model.results"),
        ({"methods": [{"name": "kernel_rbf", "sample_split": True}]}, "methods.0.sample_split"),
    ],
)
def test_unknown_fields_are_rejected(data, field):
    assert errors_of(data)[field] == "unknown field"


def test_non_finite_numbers_and_wrong_types_are_rejected():
    assert "finite" in errors_of('{"model": {"gamma": NaN}}')["model.gamma"]
    assert "finite" in errors_of('{"model": {"noise_std": Infinity}}')["model.noise_std"]
    assert "integer" in errors_of({"model": {"d": "60"}})["model.d"]
    assert "integer" in errors_of({"model": {"d": 60.5}})["model.d"]
    assert (
        "'id', 'tanh' or 'quadratic'" in errors_of({"model": {"activation": 3}})["model.activation"]
    )
    assert errors_of("{not json")  # truncated JSON is a SpecError too


def test_several_errors_are_reported_together():
    errs = errors_of({"model": {"d": 0, "gamma": 99}, "sweep": {"alphas": [1.5], "seeds": 0}})
    assert {"model.d", "model.gamma", "sweep.seeds"} <= set(errs)


def test_huge_sizes_are_rejected_in_log_space():
    # d = 10**100 would overflow a float power; the validator compares logarithms
    for data, field in (
        ({"model": {"d": 10**6}}, "model.d"),
        ({"model": {"q": 10**9}}, "model.q"),
        ({"model": {"d": 10**100}}, "model.d"),
        ({"sweep": {"alphas": [8.0]}}, "sweep.alphas"),
    ):
        assert field in errors_of(data)


def test_estimate_is_finite_monotone_and_log_space():
    small = he.parse_spec({"model": {"d": 30}, "sweep": {"alphas": [1.5, 2.0]}})
    big = he.parse_spec({"model": {"d": 60}, "sweep": {"alphas": [1.5, 2.0, 3.0]}})
    huge = he.parse_spec({"model": {"d": 100000, "q": 3}, "sweep": {"alphas": [1.5]}})
    e_small, e_big, e_huge = (he.estimate_resources(s) for s in (small, big, huge))
    assert 0 < e_small.peak_bytes < e_big.peak_bytes < e_huge.peak_bytes
    assert 0 < e_small.flops < e_big.flops < e_huge.flops
    assert math.isfinite(e_huge.log10_flops) and e_huge.log10_peak_bytes > 15
    assert e_huge.feature_dim == pytest.approx(math.comb(100002, 3), rel=1e-9)
    assert e_big.points == 3 * 3


def test_sample_sizes_sorted_and_alpha_from_n_values():
    spec = he.parse_spec({"model": {"d": 10}, "sweep": {"n_values": [1000, 100]}})
    assert spec.sample_sizes() == [(100, pytest.approx(2.0)), (1000, pytest.approx(3.0))]


def test_every_preset_validates():
    names = he.preset_names()
    assert {"fig2-cpu", "fig3-cpu", "fig4-cpu", "kernels-cpu", "fig2-d120", "kernels"} <= set(names)
    for name in names:
        spec = he.preset(name)
        # an alias gives the same spec as the preset it names
        assert spec.name == he.ALIASES.get(name, name)
    for alias, target in he.ALIASES.items():
        assert he.preset(alias).spec_hash == he.preset(target).spec_hash
    with pytest.raises(KeyError, match="fig2-cpu"):
        he.preset("nope")


@pytest.mark.parametrize(
    "name",
    [
        "a\x00b",  # NUL: PostgreSQL text cannot hold it
        "line\r\nInjected: header",
        "tab\there",
        "del\x7f",
        "c1\x85next-line",
        "c1\x9bcsi",
        "sep\u2028line",
        "para\u2029graph",
        "evil\u202egpj.sh",  # right-to-left override: shows as 'evilhs.jpg'
        "iso\u2066late\u2069",
    ],
)
def test_names_with_control_characters_are_refused_naming_the_field(name):
    with pytest.raises(he.SpecError) as raised:
        he.parse_spec({"name": name})
    [error] = raised.value.errors
    assert error["field"] == "name"
    assert "printable" in error["message"] and "U+" in error["message"]
    # the same from a JSON body
    with pytest.raises(he.SpecError) as raised:
        he.parse_spec(json.dumps({"name": name}))
    assert [e["field"] for e in raised.value.errors] == ["name"]


@pytest.mark.parametrize(
    "name",
    [
        "实验-β",
        "🧪 run 👨\u200d👩\u200d👧",  # emoji, zero-width joiners
        "a\u200bb",  # zero-width space
        "\u200fעברית\u200e mixed",  # right-to-left and left-to-right marks
        'quote"; filename="evil.sh',
        " ",
        "x" * 200,
    ],
)
def test_printable_unicode_names_are_accepted(name):
    assert he.parse_spec({"name": name}).name == name


def test_name_length_and_json_schema_pattern():
    import re

    with pytest.raises(he.SpecError):
        he.parse_spec({"name": "x" * 201})
    with pytest.raises(he.SpecError):
        he.parse_spec({"name": ""})
    schema = he.ExperimentSpec.model_json_schema()["properties"]["name"]
    pattern = re.compile(schema["pattern"])
    assert schema["maxLength"] == 200 and schema["minLength"] == 1
    assert (
        pattern.match("实验 🧪\u200d")
        and not pattern.match("a\x00")
        and not pattern.match("\u202e")
    )


def test_presets_follow_the_paper():
    # the paper's estimator (no split, rescaled h2) in every GPU preset
    for name in ("fig2-d120", "fig3-gamma0.4", "fig4", "fig5-d120", "kernels"):
        spectral = he.preset(name).method("layerwise_spectral")
        assert spectral.sample_split is False and spectral.readout == "rescale", name
    kernels = he.preset("kernels")
    for method in ("kernel_rbf", "latent_rbf"):
        m = kernels.method(method)
        assert (m.ridge, m.max_train) == (1e-4, 4000), method
    assert he.preset("kernels-nystroem").method("kernel_rbf").max_train is None
    assert he.preset("fig2-spectrum").method("layerwise_spectral").spectrum == "full"
    assert max(a for a in he.preset("fig4-staircase").sweep.alphas) == pytest.approx(3.1)


def test_pass_width_follows_the_spec_and_the_device_never_the_budget():
    from hsl_engine._eigen import CPU_EXPAND, DEFAULT_EXPAND
    from hsl_engine._estimate import pass_width

    small = he.preset("fig2-cpu")  # 216000 samples of d = 60: stored under the default budget
    assert pass_width(small, "cpu") == CPU_EXPAND < DEFAULT_EXPAND
    assert pass_width(small, "cuda:0") == DEFAULT_EXPAND
    # the paper's fig2 sweep (n up to 7 x 10^8 at d = 400) regenerates its samples per pass
    assert pass_width(he.preset("fig2-d400"), "cpu") == DEFAULT_EXPAND
    # a deployment with a smaller budget streams fig2-cpu, with the narrow passes the spec
    # chose: the estimate counts twice the passes, each regenerating the samples
    cpu = he.estimate_resources(small, sample_budget_bytes=0, device="cpu")
    gpu = he.estimate_resources(small, sample_budget_bytes=0, device="cuda")
    assert cpu.streamed and cpu.flops > 1.2 * gpu.flops
