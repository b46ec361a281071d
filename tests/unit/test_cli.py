"""The command line: a bad setting is a clear message naming it, not a traceback."""

from __future__ import annotations

import pytest

from gozon.cli import main


def test_a_bad_setting_names_the_variable_and_exits(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOZON_ORDERS_API_PORT", "eighty")
    with pytest.raises(SystemExit) as exit_info:
        main(["orders", "api"])
    message = str(exit_info.value.code)
    assert message.startswith("gozon: invalid settings:")
    assert "orders_api_port" in message


def test_production_refuses_the_development_database_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GOZON_ENVIRONMENT", "production")
    with pytest.raises(SystemExit) as exit_info:
        main(["payments", "migrate"])
    assert "development database password" in str(exit_info.value.code)


def test_an_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["orders", "dance"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'dance'" in capsys.readouterr().err
