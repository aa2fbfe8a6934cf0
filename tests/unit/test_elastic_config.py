"""Where ElasticGPUProvisioner's settings come from: kernelspec config and Jupyter config win over
the environment, the environment over the defaults."""

from __future__ import annotations

import pytest

pytest.importorskip("jupyter_client")
from traitlets import TraitError
from traitlets.config import Config, LoggingConfigurable

from provisioner.elastic import ElasticGPUProvisioner

ENV = ("HARP_AGENTS", "HARP_IDLE_TIMEOUT", "HARP_LEASE_TTL", "HARP_ACQUIRE_TIMEOUT",
       "HARP_PARK_TIMEOUT", "HARP_PARK_TTL", "HARP_PARK_LIMIT", "HARP_TOKEN",
       "HARP_REACH_TIMEOUT")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def make(parent: object = None, **config: object) -> ElasticGPUProvisioner:
    return ElasticGPUProvisioner(kernel_id="k", kernel_spec=None, parent=parent, **config)


def test_defaults() -> None:
    p = make()
    assert (p.agents, p.idle_timeout, p.lease_ttl, p.acquire_timeout) == ("auto", 60, 30, 0)
    assert p.token is None and p.agent_endpoints() == ["auto"]


def test_environment_fills_what_config_leaves_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_AGENTS", "tcp://127.0.0.1:1, tcp://127.0.0.1:2")
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "5")
    monkeypatch.setenv("HARP_LEASE_TTL", "9")
    monkeypatch.setenv("HARP_TOKEN", "secret")
    p = make()
    assert p.agent_endpoints() == ["tcp://127.0.0.1:1", "tcp://127.0.0.1:2"]
    assert (p.idle_timeout, p.lease_ttl, p.token) == (5, 9, "secret")


def test_kernelspec_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # jupyter_client passes metadata.kernel_provisioner.config as constructor arguments
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "5")
    p = make(idle_timeout=120, agents=["tcp://127.0.0.1:7"])
    assert p.idle_timeout == 120 and p.agent_endpoints() == ["tcp://127.0.0.1:7"]


def test_jupyter_config_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_LEASE_TTL", "9")
    parent = LoggingConfigurable(config=Config({"ElasticGPUProvisioner": {"lease_ttl": 12.0}}))
    assert make(parent).lease_ttl == 12


def test_bad_settings_are_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HARP_IDLE_TIMEOUT", "soon")
    with pytest.raises(TraitError, match="HARP_IDLE_TIMEOUT"):
        _ = make().idle_timeout
    with pytest.raises(TraitError, match="tcp://HOST:PORT"):
        make(agents="localhost:5555").agent_endpoints()
    with pytest.raises(TraitError, match="auto"):
        make(agents="auto,tcp://127.0.0.1:1").agent_endpoints()


def test_reach_timeout_goes_to_the_keeper(monkeypatch: pytest.MonkeyPatch) -> None:
    """How long an acquire asks a silent pool again: a setting of its own, as the others."""
    assert make()._keeper_config().reach_timeout == 30
    monkeypatch.setenv("HARP_REACH_TIMEOUT", "7")
    assert make()._keeper_config().reach_timeout == 7
    assert make(reach_timeout=90)._keeper_config().reach_timeout == 90
    help_text = ElasticGPUProvisioner.class_traits()["reach_timeout"].help
    assert "HARP_REACH_TIMEOUT" in help_text
