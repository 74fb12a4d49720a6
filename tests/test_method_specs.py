import pytest

from zigzag_viz.errors import InputError
from zigzag_viz.methods import METHODS, parse_spec, parse_specs


def test_registry_holds_one_class_per_name():
    assert {"full", "uniform", "pyramid", "zigzag"} <= set(METHODS)
    for name, cls in METHODS.items():
        assert cls.name == name and cls.summary


def test_spec_with_parameters():
    method = parse_spec("zigzag[rho=0.5,signal=entropy]")
    assert method.params["rho"] == 0.5 and method.params["signal"] == "entropy"
    assert method.spec == "zigzag[rho=0.5,signal=entropy]"
    assert parse_spec("zigzag").spec == "zigzag"


def test_list_of_specs_keeps_commas_inside_brackets():
    methods = parse_specs("full, zigzag[rho=0.5,select=knorm], pyramid[beta=10]")
    assert [m.name for m in methods] == ["full", "zigzag", "pyramid"]
    assert methods[2].params["beta"] == 10.0


@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown method 'nope'"),
        ("zigzag[foo=1]", "zigzag: unknown parameter 'foo'"),
        ("zigzag[rho=2]", "zigzag: parameter 'rho' must lie in"),
        ("zigzag[rho=abc]", "zigzag: parameter 'rho' must be a float"),
        ("zigzag[signal=xyz]", "zigzag: parameter 'signal' must be one of"),
        ("pyramid[beta]", "pyramid: write parameters as key=value"),
        ("zig zag", "cannot read method spec"),
    ],
)
def test_bad_specs_name_the_method_and_parameter(spec, message):
    with pytest.raises(InputError, match=message.replace("[", r"\[")):
        parse_spec(spec)


def test_empty_method_list_is_refused():
    with pytest.raises(InputError, match="no methods given"):
        parse_specs(" , ")
