"""`dgemma health`: the image's HEALTHCHECK and the chart's exec probes, against a fake in-process server."""

import pytest

from service import cli
from tests.unit.fake_dgemma import fake_server, free_address


@pytest.fixture(scope="module")
def target():
    with fake_server() as (t, _servicer):
        yield t


def test_serving_exits_0(target, capsys):
    assert cli.main(["health", "--server", target]) == 0
    assert capsys.readouterr().out == "SERVING\n"


def test_not_serving_exits_1(target, capsys):
    assert cli.main(["health", "--server", target, "--service", "down"]) == 1
    assert capsys.readouterr().out == "NOT_SERVING\n"


def test_server_from_env(target, capsys, monkeypatch):
    monkeypatch.setenv("DGEMMA_SERVER", target)
    assert cli.main(["health"]) == 0


def test_unreachable_exits_2_with_one_line(capsys):
    addr = free_address()
    assert cli.main(["health", "--server", addr, "--timeout", "1"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dgemma: error: UNAVAILABLE") and err.count("\n") == 1
