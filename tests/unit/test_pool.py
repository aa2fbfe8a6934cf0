import pytest

from provisioner.pool import expand_endpoints, parse_endpoints, resolve_all


def test_parse_endpoints_splits_and_checks_form() -> None:
    assert parse_endpoints(" tcp://a:5555 ,tcp://10.0.0.2:6000,,") == [
        "tcp://a:5555", "tcp://10.0.0.2:6000"]
    assert parse_endpoints(["auto"]) == ["auto"]
    for bad in ("a:5555", "tcp://a", "http://a:1"):
        with pytest.raises(ValueError, match="tcp://HOST:PORT"):
            parse_endpoints(bad)


def test_name_with_many_addresses_counts_as_many_agents() -> None:
    table = {"gpus.svc": ["10.1.0.1", "10.1.0.2", "fd00::3"], "one": ["10.1.0.9"]}
    endpoints = ["tcp://gpus.svc:5555", "tcp://one:5555", "tcp://10.1.0.1:5555"]
    result = expand_endpoints(endpoints, resolver=lambda host: table.get(host, [host]))
    assert result == [
        "tcp://10.1.0.1:5555", "tcp://10.1.0.2:5555", "tcp://[fd00::3]:5555", "tcp://one:5555"]


def test_unresolvable_name_is_kept_for_a_clear_connect_error() -> None:
    def fail(host: str) -> list[str]:
        raise OSError("no such host")

    assert expand_endpoints(["tcp://nowhere:1"], resolver=fail) == ["tcp://nowhere:1"]


def test_resolve_all_on_loopback() -> None:
    assert "127.0.0.1" in resolve_all("127.0.0.1")
