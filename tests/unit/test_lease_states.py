"""The lease states are declared once (provisioner.lease_record.KeeperState); the copies that
cannot import it, the lease event schema and the lab's TypeScript tokens, must say the same."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from harp_jupyter import magics
from provisioner.lease_record import KeeperState, ParkReason

REPO = Path(__file__).resolve().parents[2]
STATES = [str(state) for state in KeeperState]


def test_the_enum_has_the_documented_states_in_order() -> None:
    assert STATES == ["none", "acquiring", "queued", "held", "parking", "parked", "lost"]


def test_the_lease_event_schema_names_the_same_states() -> None:
    schema = yaml.safe_load(
        (REPO / "harp_jupyter/server/schemas/lease-v1.yaml").read_text())
    assert schema["properties"]["state"]["enum"] == STATES
    assert set(schema["properties"]["previous"]["enum"]) == set(STATES)


def test_the_typescript_tokens_name_the_same_states() -> None:
    tokens = (REPO / "labextension/tokens.ts").read_text()
    union = re.search(r"export type LeaseState\s*=([^;]*);", tokens)
    listed = re.search(r"export const LEASE_STATES[^=]*=\s*\[([^\]]*)\]", tokens)
    assert union is not None and listed is not None
    assert re.findall(r"'([a-z]+)'", union.group(1)) == STATES
    assert re.findall(r"'([a-z]+)'", listed.group(1)) == STATES


def test_magics_use_the_enum() -> None:
    assert magics.STATES is KeeperState


def test_park_reasons_agree_with_the_schema_and_the_tokens() -> None:
    reasons = [str(reason) for reason in ParkReason]
    schema = yaml.safe_load(
        (REPO / "harp_jupyter/server/schemas/lease-v1.yaml").read_text())
    assert schema["properties"]["parked_reason"]["enum"] == [*reasons, None]
    tokens = (REPO / "labextension/tokens.ts").read_text()
    declared = re.search(r"export type ParkReason\s*=([^;]*);", tokens)
    assert declared is not None
    assert re.findall(r"'([a-z]+)'", declared.group(1)) == reasons
