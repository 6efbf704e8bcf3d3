from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gateway_guard.cli import main

EXAMPLE = Path(__file__).parent.parent / "examples" / "settings.toml"


def test_check_prints_effective_policies(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(EXAMPLE)]) == 0
    out = capsys.readouterr().out
    assert "service 'shop'" in out
    # every route x upstream appears, with layered values
    assert "/checkout/{rest:path}  POST     payments" in out
    assert "1 (no retry)" in out
    assert "0.8 of 50 (min 10), open 15s" in out
    assert "critical" in out and "sheddable" in out


def test_check_reports_errors_and_exits_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[defaults.breaker]\nfailure_rate = 1.5\nwindw = "count"\n')
    assert main(["check", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "defaults.breaker.failure_rate: must be at most 1" in err
    assert "did you mean 'window'" in err


def test_schema_is_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert "upstreams" in schema["properties"]


def test_console_script_runs() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "gateway_guard.cli", "check", str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "payments" in done.stdout


def test_log_config_is_a_dict_config_with_the_request_filter(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["log-config", "--level", "debug"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert config["root"]["level"] == "DEBUG"
    assert config["filters"]["request_context"] == {"()": "gateway_guard.log.RequestContextFilter"}
    assert config["handlers"]["gateway_guard"]["filters"] == ["request_context"]
