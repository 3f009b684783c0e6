from eplbd import errors


def test_codes_unique_and_roundtrip():
    seen = set()
    for code, cls in errors.ERRORS_BY_CODE.items():
        assert code not in seen
        seen.add(code)
        err = errors.error_from_code(code, "bad value 7")
        assert type(err) is cls and err.code == code and "bad value 7" in str(err)


def test_unknown_code_keeps_code():
    err = errors.error_from_code(999, "x")
    assert type(err) is errors.EplbdError and err.code == 999


def test_argument_errors_are_value_errors():
    assert isinstance(errors.PolicyError("x"), ValueError)
