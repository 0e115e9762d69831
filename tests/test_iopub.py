"""The publisher batches: a display updated several times in one batch is sent once, in its last state."""

from __future__ import annotations

import copy

from polycell.iopub import _coalesce_display_updates


def _display(msg_type: str, display_id: str, text: str) -> dict:
    return {
        "msg_type": msg_type,
        "content": {"data": {"text/plain": text}, "metadata": {}, "transient": {"display_id": display_id}},
    }


CELL_A, CELL_B = {"msg_id": "a"}, {"msg_id": "b"}
STREAM = {"msg_type": "stream", "content": {"name": "stdout", "text": "x\n"}}


def test_updates_fold_into_the_first_message_of_their_display_and_cell():
    items = [
        (1, CELL_A, _display("display_data", "h", "pending"), None),
        (1, CELL_A, _display("update_display_data", "h", "running"), None),
        (1, CELL_A, STREAM, None),
        (1, CELL_A, _display("update_display_data", "h", "done"), None),
    ]
    before = copy.deepcopy(items)
    out = _coalesce_display_updates(items)
    assert [(item[2]["msg_type"], item[2]["content"].get("data")) for item in out] == [
        ("display_data", {"text/plain": "done"}),
        ("stream", None),
    ]
    assert out[0][2]["content"]["transient"] == {"display_id": "h"}
    assert items == before  # journal records are shared: never changed in place


def test_other_cells_other_displays_and_end_markers_are_left_alone():
    end = (1, CELL_A, None, lambda: None)
    items = [
        (1, CELL_A, _display("display_data", "h", "one"), None),
        (1, CELL_B, _display("display_data", "h", "one"), None),  # %job show N in another cell
        (2, CELL_A, _display("update_display_data", "other", "two"), None),  # nothing earlier: kept
        end,
        (1, CELL_B, _display("update_display_data", "h", "three"), None),
    ]
    out = _coalesce_display_updates(items)
    assert len(out) == 4
    assert out[0][2]["content"]["data"] == {"text/plain": "one"}
    assert out[1][1] is CELL_B and out[1][2]["content"]["data"] == {"text/plain": "three"}
    assert out[2][2]["msg_type"] == "update_display_data"
    assert out[3] is end
