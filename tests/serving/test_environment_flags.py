"""BALANSIS_* variables as flags: every flag of every subcommand, the command line winning."""

from __future__ import annotations

import subprocess
import sys

import pytest

from serving.cli import build_parser
from serving.environment_flags import with_environment


def parse(argv, environ):
    parser = build_parser()
    return parser.parse_args(with_environment(parser, argv, environ))


def test_each_kind_of_flag_from_its_variable():
    args = parse(["serve"], {
        "BALANSIS_PORT": "9100", "BALANSIS_HOST": "0.0.0.0", "BALANSIS_REQUIRE_AUTH": "true",
        "BALANSIS_MODEL": "/models/a.gguf '/models/with space.gguf'",  # repeated flag
        "BALANSIS_ALLOWED_ORIGINS": "https://a.example https://b.example",  # nargs='+'
        "BALANSIS_API_KEY": "sk-one", "BALANSIS_DATABASE_URL": "postgresql://db/balansis",
        "UNRELATED": "x", "BALANSIS_NOT_A_FLAG": "ignored"})
    assert args.port == 9100 and args.host == "0.0.0.0" and args.require_auth is True
    assert args.model == ["/models/a.gguf", "/models/with space.gguf"]
    assert list(args.allowed_origins) == ["https://a.example", "https://b.example"]
    assert args.api_key == ["sk-one"] and args.database_url == "postgresql://db/balansis"


def test_the_command_line_wins_and_false_means_absent():
    args = parse(["serve", "--port", "9200", "--model=/m/b.gguf"],
                 {"BALANSIS_PORT": "9100", "BALANSIS_MODEL": "/m/a.gguf", "BALANSIS_REQUIRE_AUTH": "no"})
    assert args.port == 9200 and args.model == ["/m/b.gguf"] and args.require_auth is False


def test_nested_subcommands_read_their_own_flags():
    args = parse(["keys", "create", "--name", "ci"], {"BALANSIS_DATABASE_URL": "sqlite:///k.db", "BALANSIS_RPM": "5"})
    assert args.database_url == "sqlite:///k.db" and args.rpm == 5 and args.name == "ci"


@pytest.mark.parametrize("variable, value, message", [
    ("BALANSIS_PORT", "eighty", "--port: invalid int value: 'eighty'"),
    ("BALANSIS_REQUIRE_AUTH", "maybe", "BALANSIS_REQUIRE_AUTH='maybe': expected true or false"),
    ("BALANSIS_MODEL", "'unclosed", "BALANSIS_MODEL"),
])
def test_a_bad_value_is_a_usage_error_naming_it(variable, value, message):
    result = subprocess.run([sys.executable, "-m", "serving.cli", "serve"], env={variable: value},
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and message in result.stderr, result.stderr
