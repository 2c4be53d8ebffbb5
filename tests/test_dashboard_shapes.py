"""The dashboard's mirror of the gateway's JSON shapes (gateway_svc/static/shapes.js) against the Structs
that answer them, and the gateway's JSON against the same Structs: a field renamed on either side fails
here, not as a blank cell on the page."""

from __future__ import annotations

import json
import re
from pathlib import Path

import msgspec
import pytest

from shared import httpapi, replies, runstate
from shared.events import Event

SHAPES = Path(__file__).resolve().parent.parent / "gateway_svc" / "static" / "shapes.js"
_LIST = re.compile(r"^export const (\w+) = (\[.*?\]); // (\w+)", re.M)
STRUCTS: dict[str, type[msgspec.Struct]] = {
    name: obj for mod in (httpapi, replies, runstate) for name, obj in vars(mod).items()
    if isinstance(obj, type) and issubclass(obj, msgspec.Struct)
}


def _mirrors() -> list[tuple[str, list[str], str]]:
    found = [(name, json.loads(names), struct) for name, names, struct in _LIST.findall(SHAPES.read_text())]
    assert len(found) == SHAPES.read_text().count("export const"), "a list in shapes.js not in the checked form"
    return found


def test_shapes_js_has_lists_to_check() -> None:
    assert {struct for _, _, struct in _mirrors()} >= {"RunView", "StageState", "ItemState", "ScheduleInfo", "ParamView"}


@pytest.mark.parametrize("name,fields,struct", _mirrors(), ids=lambda v: v if isinstance(v, str) else "")
def test_every_field_the_page_reads_is_a_field_of_its_struct(name: str, fields: list[str], struct: str) -> None:
    assert struct in STRUCTS, f"shapes.js {name}: no Struct {struct} in shared.httpapi/replies/runstate"
    missing = set(fields) - set(STRUCTS[struct].__struct_fields__)
    assert not missing, f"shapes.js {name} reads {sorted(missing)}, which {struct} does not have"


def test_the_run_detail_json_has_every_documented_field_even_when_empty() -> None:
    """No omit_defaults on the HTTP shapes: a JSON client sees null or "", never a missing key."""
    page = httpapi.RunPage(run_id="r", pipeline="p", status="queued", trigger="manual", schedule=None, slot=None,
                           params={}, queued_at=None, started_at=None, ended_at=None, msg="", last_seq=1,
                           stages=[runstate.StageState(name="nap", items={"ES": runstate.ItemState()})])
    body = json.loads(msgspec.json.encode(page))
    assert set(body) == set(httpapi.RunPage.__struct_fields__)
    assert set(body["stages"][0]) == set(runstate.StageState.__struct_fields__)
    assert set(body["stages"][0]["items"]["ES"]) == set(runstate.ItemState.__struct_fields__)
    assert body["waiting"] is None and body["scheduler"] is None and body["stages"][0]["started_at"] is None


def test_the_events_page_encodes_events_as_the_journal_does() -> None:
    ev = Event(run_id="r", seq=1, timestamp="2026-01-01T00:00:00+00:00", stage="pipeline", event="queued", msg="q")
    body = json.loads(msgspec.json.encode(httpapi.EventsPage(run_id="r", events=[ev], next_after_seq=1, more=False,
                                                             gaps=[])))
    assert body["events"] == [json.loads(msgspec.json.encode(ev))]
